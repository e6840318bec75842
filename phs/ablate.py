"""``python -m phs.ablate [variants=[a,b]] [common=[...]]``: an ablation study in one command.

Trains one method once per named variant (``conf/ablate.yaml``: a list of overrides on top of
``base``), all with the same seed, data split and budget, evaluates each on the **validation**
split (settings are chosen there, never on the test split) with an f_pre trained once per
distinct preprocessing, and writes ``ablation.md`` / ``.csv`` / ``.json``: identity,
healthiness, S Dice, PSNR inside and outside the lesion against the true healthy image, the
residual's anomaly-detection AUPRC and the training minutes of each variant. A finished variant
is reused when the command is run again with the same ``hydra.run.dir``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from phs.cli import friendly_errors, searchpath_overrides
from phs.errors import PhsError
from phs.io import write_json, write_text

log = logging.getLogger(__name__)

COLUMNS = (  # (metrics.json key, column title, format)
    ("dice", "S Dice", "{:.3f}"),
    ("identity", "identity", "{:.3f}"),
    ("healthiness", "healthiness", "{:.2f}"),
    ("psnr_lesion", "PSNR lesion", "{:.1f}"),
    ("psnr_lesion_input", "(input)", "{:.1f}"),
    ("psnr_outside", "PSNR outside", "{:.1f}"),
    ("mae_outside", "MAE outside", "{:.3f}"),
    ("texture_lesion", "texture", "{:.2f}"),
    ("anomaly_residual_auprc", "residual AUPRC", "{:.2f}"),
    ("anomaly_mask_auprc", "S AUPRC", "{:.2f}"),
)


def _data_key(overrides: list[str]) -> str:
    """The preprocessing a variant trains on (its ``data.*`` overrides), as a short key."""
    data = sorted(o for o in overrides if o.startswith("data."))
    return hashlib.sha1("\n".join(data).encode()).hexdigest()[:8]


def render(rows: dict[str, dict[str, Any]], variants: dict[str, list[str]]) -> str:
    from phs.evaluation import markdown_table, mean_cell

    header = ["variant", *(t for _, t, _ in COLUMNS), "minutes", "overrides"]
    body = [
        [
            name,
            *(mean_cell(m, k, fmt) for k, _, fmt in COLUMNS),
            f"{m['minutes']:.1f}",
            " ".join(f"`{o}`" for o in variants[name]) or "(defaults)",
        ]
        for name, m in rows.items()
    ]
    return markdown_table(header, body)


@friendly_errors
def run(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    # torch, Lightning and MONAI load here, once Hydra has checked the config
    from phs.evaluation import write_table
    from phs.runs import evaluate_checkpoint, train_once

    out = Path(cfg.paths.output_dir)
    variants = {k: list(v or []) for k, v in cfg.variants.items()}
    chosen = list(cfg.run) if cfg.get("run") else list(variants)
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        raise PhsError(f"unknown variant(s) {unknown}; conf/ablate.yaml has {sorted(variants)}")
    hc = HydraConfig.get()
    data_overrides = [o for o in hc.overrides.task if o.startswith("data.")]
    base = [
        *searchpath_overrides(),  # a variant may use the user's own configs (model=..., data=...)
        f"data={hc.runtime.choices['data']}",
        *data_overrides,
        f"seed={cfg.seed}",
        *cfg.base,
    ]
    common = list(cfg.common)  # last: it may override a variant (e.g. a smoke-test size)
    rows: dict[str, dict[str, Any]] = {}
    for name in chosen:
        over = variants[name]
        f_pre = None
        if cfg.healthiness:  # f_pre on the variant's preprocessing, the same for every variant
            seg_over = [*base, "model=segmentor", "test=false"]  # sharing it (whatever its order)
            seg_over += [o for o in over if o.startswith("data.")] + common
            f_pre, _ = train_once(out / f"f_pre-{_data_key(over)}", seg_over)
        log.info("variant %s: %s", name, over or "(defaults)")
        ckpt, minutes = train_once(out / name, [*base, *over, *common, "test=false"])
        done = out / name / "eval" / f"metrics-{cfg.split}.json"
        if done.exists():
            metrics = json.loads(done.read_text())
        else:
            metrics = evaluate_checkpoint(
                str(ckpt), str(f_pre) if f_pre else None, None, out / name / "eval", split=cfg.split
            )
            write_json(done, metrics)
        rows[name] = {**metrics, "minutes": minutes}
        # the table so far, after every variant: nothing lost if a later one fails
        table = render(rows, variants)
        text = (
            f"# Ablation: `{' '.join(base + common)}`, {cfg.split} split\n\n{table}\n\n"
            "PSNR in dB against the true healthy image (brain pixels), inside the true lesion "
            "and outside it; (input): the untouched input inside the lesion. Residual AUPRC: "
            "pixel-level anomaly detection from |x - G(x)|; S AUPRC: from S(x). Texture: the "
            "fine detail inside the lesion against the truth's (1: as textured, 0: flat). "
            "Minutes: training only.\n"
        )
        write_text(out / "ablation.md", text)
        results = {"base": base + common, "split": cfg.split, "variants": variants, "results": rows}
        write_json(out / "ablation.json", results)
        write_table(
            out / "ablation.csv",
            [
                {
                    "variant": n,
                    **{k: m.get(k, {}).get("mean") for k, _, _ in COLUMNS},
                    "minutes": f"{m['minutes']:.2f}",
                    "overrides": " ".join(variants[n]),
                }
                for n, m in rows.items()
            ],
        )
    print((out / "ablation.md").read_text())
    print(f"written: {out / 'ablation.md'}")
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="ablate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
