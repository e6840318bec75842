"""Shared plumbing of the command-line tools: clean one-line errors and exit code 2."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from phs.errors import PhsError


def _user_error(err: BaseException) -> BaseException | None:
    """The user-facing error in ``err``'s cause chain (Hydra's instantiate wraps them)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, PhsError | OmegaConfBaseException):
            return err
        err = err.__cause__ or err.__context__
    return None


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print ``error: <message>`` and exit 2 for input/config errors (traceback with HYDRA_FULL_ERROR=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            user = _user_error(err)
            if user is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_multirun():
                raise  # in a sweep, a failing job is reported by Hydra and the sweep goes on
            msg = str(user).strip().splitlines()
            print(f"error: {' '.join(m.strip() for m in msg if m.strip())}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def searchpath_overrides() -> list[str]:
    """The command line's ``hydra.searchpath=[...]`` (configs of the user's own methods or data),
    to hand on to the trainings an app composes: Hydra applies it to the app's own config only."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.hydra if o.startswith("hydra.searchpath=")]


def require_group(group: str, app: str, argv: list[str] | None = None) -> None:
    """Exit 2 with a hint where the command line sets ``<group>.<key>=...`` of a config group
    that defaults to nothing without choosing the group (Hydra says only "Key not in struct")."""
    argv = sys.argv[1:] if argv is None else argv
    names = [a.split("=", 1)[0].lstrip("+~") for a in argv]
    keys = [a for a, n in zip(argv, names, strict=True) if n.startswith(f"{group}.")]
    if keys and group not in names:
        print(
            f"error: {keys[0]} needs {group}=<source> too (e.g. {group}=brats {keys[0]}): "
            f"without {group}=, {app} uses the checkpoint's own {group} config as it is",
            file=sys.stderr,
        )
        sys.exit(2)
