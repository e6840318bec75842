"""Every ``python -m phs.<app> ...`` command in README.md and docs/*.md parses.

A command is found in fenced code blocks (backslash continuations joined) and in inline code
spans (which may wrap across lines), with whatever precedes it on its line (``PHS_CACHE_DIR=...``,
``time``, ``pip install ... &&``). It parses when the shell would pass its arguments through
(no unquoted ``(``, ``)``, ``<``, ``>`` such as a ``<run>`` placeholder), the app module
``phs.<app>`` exists and its Hydra config (the ``config_name`` of its ``@hydra.main``) composes
with the overrides, in process with Hydra's compose API: an unknown config group option or an
unknown key fails. Sweeps (``a=1,2``, ``choice(...)``, ``range(...)``, ``interval(...)``,
``glob(...)``) are composed at their first value and need ``-m``/``--multirun`` (or a config
that sets ``hydra.mode: MULTIRUN``). ``phs.ablate`` and ``phs.reproduce`` also compose the
trainings they would launch (their ``run`` / ``common`` / ``train_overrides``).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, IntervalSweep, Override
from hydra.types import RunMode
from omegaconf import DictConfig

CONF = REPO / "conf"
README_MAX_LINES = 160

CMD = re.compile(r"\bpython3?\s+-m\s+phs\.(\w*)")
FENCE = re.compile(r"^\s*(```|~~~)")
SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.S)
SHELL_PUNCT = set("();<>|&")
STOP = {";", "&&", "||", "|", "&", ">", ">>"}  # the command ends here (next command, redirect)
FLAG_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn"}
INFO = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # --info [what]
FLAG_ALONE = {"-m", "--multirun", "--resolve", "--help", "-h", "--hydra-help"}


class CommandError(Exception):
    """A documented command that would not run."""


@dataclass(frozen=True)
class Command:
    file: str  # relative to the repository
    line: int  # 1-based line of ``python -m``
    text: str  # from ``python -m`` to the end of the (joined) line

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


# --------------------------------------------------------------------------- extraction


def extract(path: Path, root: Path = REPO) -> list[Command]:
    """The ``python -m phs.*`` commands of a Markdown file, in order."""
    rel = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Command] = []
    prose: list[str] = []  # the file with fenced blocks blanked (line numbers kept)
    in_fence, i = False, 0
    while i < len(lines):
        line = lines[i]
        if FENCE.match(line):
            in_fence = not in_fence
            prose.append("")
        elif in_fence:
            start, logical = i, line
            while logical.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                logical = logical.rstrip()[:-1] + " " + lines[i].strip()
                prose.append("")
            prose.append("")
            found += [Command(rel, start + 1, logical[m.start() :]) for m in CMD.finditer(logical)]
        else:
            prose.append(line)
        i += 1
    # inline code spans, paragraph by paragraph (a span never crosses a blank line)
    para_start = 0
    for n, line in enumerate([*prose, ""]):
        if line.strip():
            continue
        text = "\n".join(prose[para_start:n])
        for span in SPAN.finditer(text):
            code = span.group(2)
            for m in CMD.finditer(code):
                line_no = para_start + 1 + text.count("\n", 0, span.start(2) + m.start())
                one_line = " ".join(code[m.start() :].split()).replace("\\|", "|")
                found.append(Command(rel, line_no, one_line))
        para_start = n + 1
    return sorted(found, key=lambda c: c.line)


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def all_commands() -> list[Command]:
    return [c for f in doc_files() for c in extract(f)]


def needs_user_configs(cmd: Command) -> bool:
    """A command of docs/extending.md that takes the page's own config folder (``$PWD/...``):
    tests/test_extending.py writes that folder and checks these."""
    return "hydra.searchpath=" in cmd.text and "$PWD" in cmd.text


# --------------------------------------------------------------------------- parsing


def split_command(text: str) -> tuple[str, list[str]]:
    """``python -m phs.<app> args...`` -> (app, argv as the shell would pass it)."""
    m = CMD.match(text)
    if m is None:
        raise CommandError("not a `python -m phs.<app>` command")
    lex = shlex.shlex(text[m.end() :], posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, ""
    argv: list[str] = []
    try:
        for tok in lex:  # lazily: a quote in a trailing comment is never read
            if tok.startswith("#"):
                break
            if tok and set(tok) <= SHELL_PUNCT:
                if tok in STOP:
                    break
                raise CommandError(
                    f"unquoted {tok!r}: the shell would not pass this on "
                    "(quote the argument; write placeholders as RUN, CKPT, PATH, not <run>)"
                )
            argv.append(tok)
    except ValueError as err:  # unbalanced quotes
        raise CommandError(f"shell syntax: {err}") from None
    return m.group(1), argv


def _app_sources(app: str) -> list[Path]:
    """The files that ``python -m phs.<app>`` runs: the module, or a package's ``__main__.py``
    first and then the rest of the package."""
    spec = importlib.util.find_spec(f"phs.{app}") if app.isidentifier() else None
    if spec is None:
        raise CommandError(f"no module phs.{app}")
    if spec.submodule_search_locations is None:
        return [Path(spec.origin)]
    folders = [Path(p) for p in spec.submodule_search_locations]
    main = [f / "__main__.py" for f in folders if (f / "__main__.py").is_file()]
    if not main:
        raise CommandError(f"phs.{app} is a package without __main__.py: `python -m` cannot run it")
    return main + sorted(p for f in folders for p in f.rglob("*.py") if p not in main)


def app_config_name(app: str) -> str:
    """The ``config_name`` of the app's ``@hydra.main`` (read from its source, not imported)."""
    for source in _app_sources(app):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "hydra.main":
                kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
                if (source.parent / str(kw.get("config_path"))).resolve() != CONF.resolve():
                    raise CommandError(
                        f"phs.{app}: config_path {kw.get('config_path')!r} is not conf/"
                    )
                return kw["config_name"]
    raise CommandError(f"phs.{app} has no @hydra.main: not a command-line app")


def _first_value(o: Override) -> str:
    """The override at its sweep's first value (``a=1,2`` -> ``a=1``)."""
    v = o.value()
    if isinstance(v, IntervalSweep):
        first = str(v.start)
    elif isinstance(v, Glob):  # a config group: its options under conf/, sorted
        group = CONF / o.key_or_group
        options = sorted(p.stem for p in group.glob("*.yaml") if not p.stem.startswith("_"))
        matched = v.filter(options)
        if not matched:
            raise CommandError(f"{o.input_line}: glob matches no option of {o.key_or_group}")
        first = matched[0]
    else:
        first = next(iter(o.sweep_string_iterator()))
    return f"{o.get_key_element()}={first}"


def parse_argv(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """Hydra's own flags taken out: (overrides, multirun, --config-name)."""
    overrides, multirun, config_name = [], False, None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg == "--info":
            if args and args[0] in INFO:
                args.pop(0)
        elif arg in FLAG_WITH_VALUE:
            value = args.pop(0) if args else None
            if value is None:
                raise CommandError(f"{arg} needs a value")
            if arg in ("--cfg", "-c") and value not in ("job", "hydra", "all"):
                raise CommandError(f"{arg} {value}: expected job, hydra or all")
            if arg in ("--config-name", "-cn"):
                config_name = value
        elif arg in FLAG_ALONE:
            pass
        elif arg.startswith("-"):
            raise CommandError(f"unknown flag {arg}")
        else:
            overrides.append(arg)
    return overrides, multirun, config_name


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    return compose(config_name, overrides=overrides, return_hydra_config=True)


def _check_trainings(app: str, cfg: DictConfig, task: list[str]) -> None:
    """The ``phs.train`` configs that ``phs.ablate`` / ``phs.reproduce`` compose, as they do."""
    data = [f"data={cfg.hydra.runtime.choices['data']}", *(o for o in task if o[:5] == "data.")]
    if app == "ablate":
        variants = {k: list(v or []) for k, v in cfg.variants.items()}
        chosen = list(cfg.run) if cfg.get("run") else list(variants)
        unknown = [v for v in chosen if v not in variants]
        if unknown:
            raise CommandError(
                f"unknown variant(s) {unknown}; conf/ablate.yaml has {sorted(variants)}"
            )
        base = [*data, f"seed={cfg.seed}", *cfg.base]
        runs = [[*base, "model=segmentor", "test=false", *cfg.common]]
        runs += [[*base, *variants[v], *cfg.common, "test=false"] for v in chosen]
    else:
        common = [
            *data,
            f"experiment={cfg.train_experiment}",
            f"seed={cfg.seed}",
            *cfg.train_overrides,
        ]
        runs = [[*common, f"model={m}"] for m in ["segmentor", *cfg.methods]]
    searchpath = [o for o in task if o.startswith("hydra.searchpath=")]  # handed on, as the apps do
    for over in runs:
        try:
            compose("train", overrides=[*searchpath, *over])
        except Exception as err:
            raise CommandError(
                f"the training it launches does not compose ({over}): {err}"
            ) from None


def check_command(text: str) -> DictConfig:
    """Compose the command's config as its app would; raise CommandError if it does not parse."""
    app, argv = split_command(text)
    config_name = app_config_name(app)
    overrides, multirun, named = parse_argv(argv)
    config_name = named or config_name
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise CommandError(f"override syntax: {err}") from None
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if any(o.is_sweep_override() and o.is_hydra_override() for o in parsed):
        raise CommandError(f"Hydra's own configuration cannot be swept: {sweeps}")
    first = [_first_value(o) if o.is_sweep_override() else o.input_line for o in parsed]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name=app):
        try:
            cfg = _compose(config_name, first)
        except Exception as err:
            raise CommandError(f"{type(err).__name__}: {err}") from None
        if sweeps and not multirun and cfg.hydra.mode != RunMode.MULTIRUN:
            raise CommandError(f"sweep {sweeps} without -m/--multirun")
        if app in ("ablate", "reproduce"):
            _check_trainings(app, cfg, [o.input_line for o in parsed])
    return cfg


# --------------------------------------------------------------------------- tests

COMMANDS = [c for c in all_commands() if not needs_user_configs(c)]


def test_readme_is_a_short_front_door() -> None:
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"


def test_commands_are_found_for_every_app() -> None:
    apps = {CMD.match(c.text).group(1) for c in COMMANDS}
    assert {"train", "evaluate", "reproduce", "synthesize", "ablate", "phantom", "inspect"} <= apps
    assert any(re.search(r" (-m|--multirun) ", c.text) for c in COMMANDS), "no multirun example"
    assert any(c.file == "README.md" for c in COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_parses(cmd: Command) -> None:
    try:
        check_command(cmd.text)
    except CommandError as err:
        pytest.fail(f"{cmd.id}: `{cmd.text}` does not parse: {err}", pytrace=False)


@pytest.mark.parametrize(
    "text, why",
    [
        ("python -m phs.train model=nope", "nope"),
        ("python -m phs.train model.loss.lambda_nope=1", "lambda_nope"),
        ("python -m phs.train nope=1", "nope"),
        ("python -m phs.train -m model=nope,cgan", "nope"),
        ("python -m phs.train model.loss.lambda_cc=1,10", "multirun"),
        ("python -m phs.nope data=brats", "phs.nope"),
        ("python -m phs.cli", "hydra.main"),
        ("python -m phs.train --bogus", "--bogus"),
        ("python -m phs.train -m hydra.run.dir=a,b", "cannot be swept"),
        ("python -m phs.train --cfg everything", "everything"),
        ("python -m phs.evaluate ckpt_path=<run>/checkpoints/last.ckpt", "'<'"),
        ("python -m phs.train -m model.optimizer.lr=choice(1e-4,2e-4)", "'('"),
        ("python -m phs.evaluate ckpt_path=CKPT data.root=/data", "data.root"),
        ("python -m phs.ablate 'run=[paper,nope]'", "nope"),
        ("python -m phs.ablate 'common=[\"trainer.max_stepz=1\"]'", "max_stepz"),
        ("python -m phs.reproduce 'methods=[nope]'", "nope"),
        ("python -m phs.train 'model=cgan", "shell syntax"),
    ],
)
def test_a_broken_command_is_reported(text: str, why: str) -> None:
    with pytest.raises(CommandError, match=re.escape(why)):
        check_command(text)


def test_valid_forms_parse() -> None:
    cfg = check_command(
        "python -m phs.train -m 'model.optimizer.lr=choice(1e-4,2e-4)' model.loss.lambda_cc=1,10 "
        "'trainer.max_steps=range(10,30,10)' +extra=1 hydra.run.dir=x/y --cfg job --resolve"
        "  # a comment's"
    )
    assert cfg.model.optimizer.lr == 1e-4 and cfg.model.loss.lambda_cc == 1
    assert cfg.trainer.max_steps == 10 and cfg.extra == 1 and cfg.hydra.run.dir == "x/y"
    cfg = check_command("python -m phs.train -m 'model=glob(proposed_*)' hydra/launcher=slurm")
    assert cfg.hydra.runtime.choices["model"] == "proposed_paired"
    cfg = check_command("python -m phs.train --info defaults hparams_search=lambda_optuna --info")
    assert cfg.hydra.sweeper.n_trials == 20
    cfg = check_command("python -m phs.train hparams_search=lambda_optuna hydra.sweeper.n_trials=3")
    assert cfg.hydra.sweeper.n_trials == 3
    cfg = check_command("python -m phs.synthesize ckpt_path=CKPT input=PATH output=DIR && ls DIR")
    assert cfg.input == "PATH" and cfg.output == "DIR"


def test_extraction_finds_every_form(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text(
        "Prose `python -m phs.train model=cgan` and a wrapped `python -m phs.train\n"
        "data=brats` span.\n"
        "\n"
        "| a | `time python -m phs.phantom out=ph kind=brats` | 1 s |\n"
        "\n"
        "```bash\n"
        "pip install -e . && python -m phs.train   # the demo\n"
        "PHS_CACHE_DIR=$(mktemp -d) python -m phs.inspect \\\n"
        "    data=isles \\\n"
        "    out=s.json\n"
        "python -m pytest\n"
        "```\n"
        "`python -m phs.ablate 'run=[paper]'`\n",
        encoding="utf-8",
    )
    got = [(c.line, c.text) for c in extract(md, tmp_path)]
    assert got == [
        (1, "python -m phs.train model=cgan"),
        (1, "python -m phs.train data=brats"),
        (4, "python -m phs.phantom out=ph kind=brats"),
        (7, "python -m phs.train   # the demo"),
        (8, "python -m phs.inspect  data=isles  out=s.json"),
        (13, "python -m phs.ablate 'run=[paper]'"),
    ]
    assert split_command(got[4][1]) == ("inspect", ["data=isles", "out=s.json"])
    assert split_command(got[3][1]) == ("train", [])
