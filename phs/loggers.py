"""Logger factories: W&B online when the user has credentials, offline otherwise (never a prompt)."""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.loggers import WandbLogger


def wandb_credentials() -> bool:
    """Whether W&B can log in without asking: an API key in the environment or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(
    save_dir: str,
    mode: str = "auto",
    resume_id_file: str | None = None,
    resuming: bool = False,
    **kwargs: Any,
) -> WandbLogger:
    """A ``WandbLogger``: ``mode`` ``online``, ``offline`` or ``auto`` (online with credentials
    and no ``WANDB_MODE`` saying otherwise, offline without). Offline runs are written to
    ``<save_dir>/wandb/offline-run-*`` (``wandb sync`` uploads them). The run id is kept in
    ``resume_id_file`` so a resumed training (``resuming``) continues the same run: online, the
    same W&B run; offline, a new ``offline-run-*`` folder with the same id, which ``wandb sync``
    uploads into one run after the first. A fresh training gets a fresh id."""
    env_mode = os.environ.get("WANDB_MODE")
    if mode == "auto":
        mode = (
            env_mode
            if env_mode in ("online", "offline", "disabled")
            else ("online" if wandb_credentials() else "offline")
        )
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = mode  # wandb itself must never prompt for a login
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run_id = None
    if resuming and resume_id_file and Path(resume_id_file).exists():
        run_id = Path(resume_id_file).read_text().strip() or None
    if resume_id_file and run_id is None:  # chosen here: W&B names a run only once it starts
        run_id = uuid.uuid4().hex[:8]
    if mode == "online" and run_id:
        kwargs.setdefault("resume", "allow")
    if mode != "online":
        kwargs["log_model"] = False  # W&B cannot upload checkpoints offline
    logger = WandbLogger(save_dir=save_dir, offline=mode != "online", id=run_id, **kwargs)
    if resume_id_file and rank_zero_only.rank == 0:  # run_id is set whenever the file is named
        Path(resume_id_file).write_text(run_id)
    return logger
