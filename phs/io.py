"""Small shared plumbing: atomic writes and progress bars (plain Python, no torch)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary name beside ``path``; on success rename it onto ``path``.

    A crash (or an exception in the block) leaves ``path`` as it was and removes the temporary.
    ``suffix`` keeps an extension a writer needs (``".nii.gz"``, ``".png"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, content: Any, indent: int = 2) -> Path:
    """Write ``content`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(content, indent=indent))


class progress:
    """A rich progress bar with an ``advance()`` callable, or nothing when ``enabled`` is false.

    ``with progress("caching", total=n) as advance: ... advance()``. ``print`` on the returned
    object is not needed: messages printed meanwhile go above the bar (use :func:`console`).
    """

    def __init__(self, description: str, total: int | None = None, enabled: bool = True) -> None:
        self.description, self.total, self.enabled = description, total, enabled
        self._bar: Any = None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._bar.__enter__()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda: self._bar.advance(task)

    def print(self, *args: Any) -> None:
        """Print above the bar (or plainly when disabled)."""
        if self._bar is not None:
            self._bar.console.print(*args)
        else:
            print(*args)

    def __exit__(self, *exc: Any) -> bool:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
        return False
