"""The house rules of docs/index.md, checked on the source: apps do not import apps, no module
imports another's private names, and the ground floor stays free of Lightning and Hydra."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PHS = Path(__file__).resolve().parents[1] / "phs"


def _module(path: Path) -> str:
    parts = path.relative_to(PHS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PHS.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in a file (function-level ones included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def _is_app(path: Path) -> bool:
    """A command-line app: a module with a ``@hydra.main`` entry point."""
    return "hydra.main(" in path.read_text()


APPS = {m for m, p in MODULES.items() if _is_app(p)}


def test_the_apps_are_found() -> None:
    assert {"phs.train", "phs.evaluate", "phs.synthesize", "phs.reproduce"} <= APPS


@pytest.mark.parametrize("app", sorted(APPS))
def test_no_app_imports_another_app(app: str) -> None:
    package = app.rsplit(".", 1)[0] if MODULES[app].name == "__main__.py" else app
    others = {a for a in APPS if a != app and not a.startswith(package + ".")}
    imported = {m for m, names in _imports(MODULES[app])}
    imported |= {f"{m}.{n}" for m, names in _imports(MODULES[app]) for n in names}
    assert not (imported & others), f"{app} imports {sorted(imported & others)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_modules(module: str) -> None:
    bad = [
        f"{m}.{n}"
        for m, names in _imports(MODULES[module])
        for n in names
        if m.startswith("phs") and n.startswith("_") and m != module
    ]
    assert not bad, f"{module} imports private names {bad}"


@pytest.mark.parametrize("module", ["phs.nets", "phs.losses", "phs.metrics", "phs.io", "phs.plots"])
def test_ground_floor_has_no_lightning_or_hydra(module: str) -> None:
    files = [p for m, p in MODULES.items() if m == module or m.startswith(module + ".")]
    assert files
    for path in files:
        roots = {m.split(".")[0] for m, _ in _imports(path)}
        assert not roots & {"pytorch_lightning", "lightning", "hydra"}, path


def test_the_data_package_exports_resolve_on_first_use() -> None:
    """``phs.data`` loads its submodules lazily; every exported name must still resolve."""
    import phs.data

    for name in phs.data.__all__:
        assert getattr(phs.data, name).__name__ == name
    with pytest.raises(AttributeError):
        phs.data.PHSDataModul  # noqa: B018
