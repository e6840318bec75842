"""``python -m phs.reproduce data=synthetic_brats``: Table 1 and Figure 4 in one command.

Trains f_pre (``model=segmentor``) and the four methods with the same data config (so the same
split), evaluates each on the test split with f_pre, and writes ``table1.md`` / ``.csv`` /
``.json`` (identity and healthiness, mean ± std over test slices; best in bold; a star where a
proposed method beats the best baseline in a paired two-sided Wilcoxon signed-rank test over the
test slices at ``alpha``) and ``figure4.png``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from phs.checkpoint import load_method
from phs.cli import friendly_errors, searchpath_overrides
from phs.errors import PhsError
from phs.io import write_json, write_text
from phs.plots import save_grid

log = logging.getLogger(__name__)

LABELS = {
    "cgan": "conditional GAN",
    "cyclegan": "CycleGAN",
    "proposed_unpaired": "proposed (unpaired)",
    "proposed_paired": "proposed (paired)",
}
BASELINES = ("cgan", "cyclegan")
TABLE_METRICS = ("identity", "healthiness")
EXTRA_METRICS = (
    "psnr_lesion",
    "psnr_outside",
    "mae_lesion",
    "anomaly_residual_auprc",
    "anomaly_residual_best_dice",
    "anomaly_mask_auprc",
    "anomaly_mask_best_dice",
)
PAPER = {  # Table 1 of Xia et al. 2019: (BraTS identity, healthiness), (ISLES identity, healthiness)
    "cgan": ("0.74 ± 0.05", "0.82 ± 0.03", "0.67 ± 0.02", "0.86 ± 0.13"),
    "cyclegan": ("0.80 ± 0.03", "0.83 ± 0.04", "0.78 ± 0.02", "0.85 ± 0.11"),
    "proposed_unpaired": ("0.83 ± 0.03", "0.98 ± 0.07*", "0.82 ± 0.03", "0.94 ± 0.11*"),
    "proposed_paired": ("0.88 ± 0.03*", "0.99 ± 0.02*", "0.93 ± 0.02*", "0.98 ± 0.04*"),
}


def read_rows(path: Path) -> dict[tuple[str, int], dict[str, float]]:
    """Per-slice metrics keyed by (case, slice)."""
    with open(path) as f:
        return {
            (r["case"], int(r["slice"])): {
                k: float(v) for k, v in r.items() if k not in ("case", "slice")
            }
            for r in csv.DictReader(f)
        }


def significance(
    rows: dict[str, dict], methods: list[str], summary: dict[str, dict], alpha: float
) -> dict:
    """For each proposed method and metric: p-value against the best baseline (by mean)."""
    from phs.metrics import wilcoxon_signed_rank

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in TABLE_METRICS:
        baselines = [m for m in methods if m in BASELINES and metric in summary[m]]
        if not baselines:
            continue
        best = max(baselines, key=lambda m: summary[m][metric]["mean"])
        for m in methods:
            if m in BASELINES or metric not in summary[m]:
                continue
            keys = sorted(set(rows[m]) & set(rows[best]))
            a = [rows[m][k][metric] for k in keys]
            b = [rows[best][k][metric] for k in keys]
            p = wilcoxon_signed_rank(a, b)
            better = summary[m][metric]["mean"] > summary[best][metric]["mean"]
            out.setdefault(m, {})[metric] = {
                "against": best,
                "p": p,
                "n": len(keys),
                "significant": bool(better and p < alpha),
            }
    return out


def render_table(dataset: str, methods: list[str], summary: dict, sig: dict) -> str:
    """Table 1 layout: methods as rows, identity and healthiness; best in bold; star = significant."""
    lines = [f"| method | {dataset} identity | {dataset} healthiness |", "|---|---|---|"]
    best = {
        m: max((summary[x][m]["mean"] for x in methods if m in summary[x]), default=None)
        for m in TABLE_METRICS
    }
    for method in methods:
        cells = []
        for metric in TABLE_METRICS:
            s = summary[method].get(metric)
            if s is None:
                cells.append("-")
                continue
            cell = f"{s['mean']:.2f} ± {s['std']:.2f}"
            if sig.get(method, {}).get(metric, {}).get("significant"):
                cell += "*"
            cells.append(f"**{cell}**" if s["mean"] == best[metric] else cell)
        lines.append(f"| {LABELS.get(method, method)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def figure4(out: Path, methods: list[str], ckpts: dict[str, Path], datamodule: Any, n: int) -> Path:
    """Rows: test slices with the largest lesions (distinct cases); columns: input, each method, truth."""
    import torch

    store = datamodule.stores["test"]
    area = store.label.flatten(1).sum(1)
    picks, seen = [], set()
    for i in torch.argsort(area, descending=True).tolist():
        case = int(store.case_idx[i])
        if case not in seen:
            picks.append(i)
            seen.add(case)
        if len(picks) == n:
            break
    x_p = store.image[picks]
    visuals = {"x_p": x_p}
    for m in methods:
        model, _ = load_method(ckpts[m])
        with torch.no_grad():
            visuals[m] = model.infer(x_p)["pseudo_healthy"].float()
    if store.healthy is not None:
        visuals["x_gt"] = store.healthy[picks]
    visuals["m_p"] = store.label[picks]
    title = "Figure 4: pseudo-healthy images of test slices"
    return save_grid(visuals, out / "figure4.png", title, titles=LABELS)


def f_pre_checkpoint(last: Path, which: str) -> Path:
    """f_pre's checkpoint: ``best`` (its best validation Dice; ``last`` if none was saved) or
    ``last``."""
    best = sorted(last.parent.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return best[-1] if which == "best" and best else last


@friendly_errors
def run(cfg: DictConfig) -> dict[str, Any]:
    if cfg.f_pre_checkpoint not in ("best", "last"):  # fail before any training
        raise PhsError(f"f_pre_checkpoint must be 'best' or 'last', not '{cfg.f_pre_checkpoint}'")
    # the model= options phs.train would find, with the command line's own config folders
    searchpath = searchpath_overrides()
    groups = GlobalHydra.instance().config_loader()
    models = [
        m
        for m in groups.get_group_options("model", config_name="train", overrides=searchpath)
        if m != "segmentor"
    ]
    unknown = [m for m in cfg.methods if m not in models]
    if unknown or not cfg.methods or len(set(cfg.methods)) < len(cfg.methods):
        raise PhsError(
            f"methods must name different methods of conf/model/ ({', '.join(models)}); "
            f"got {list(cfg.methods)}"
        )
    # torch, Lightning and MONAI load here, once the options are checked
    from phs.evaluation import markdown_table, mean_cell, write_table
    from phs.runs import evaluate_checkpoint, train_once

    out = Path(cfg.paths.output_dir)
    hc = HydraConfig.get()
    data_choice = hc.runtime.choices["data"]
    data_overrides = [o for o in hc.overrides.task if o.startswith("data.")]
    common = [
        *searchpath,
        f"data={data_choice}",
        *data_overrides,
        f"experiment={cfg.train_experiment}",
        f"seed={cfg.seed}",
        *cfg.train_overrides,
    ]
    ckpts: dict[str, Path] = {}
    for method in ["segmentor", *cfg.methods]:
        log.info("%s", method)
        over = [*common, f"model={method}", "test=false"]  # evaluated below
        if method == "segmentor":
            over += list(cfg.f_pre_overrides)
        ckpts[method], _ = train_once(out / method, over)
    ckpts["segmentor"] = f_pre_checkpoint(ckpts["segmentor"], cfg.f_pre_checkpoint)
    f_pre_eval = out / "segmentor" / "eval"
    f_pre = evaluate_checkpoint(str(ckpts["segmentor"]), None, None, f_pre_eval)
    summary, rows = {}, {}
    for method in cfg.methods:
        summary[method] = evaluate_checkpoint(
            str(ckpts[method]), str(ckpts["segmentor"]), None, out / method / "eval"
        )
        rows[method] = read_rows(out / method / "eval" / "test_metrics.csv")
    sig = significance(rows, list(cfg.methods), summary, cfg.alpha)
    dataset = data_choice
    table = render_table(dataset, list(cfg.methods), summary, sig)
    extra = markdown_table(
        ["method", *EXTRA_METRICS],
        [
            [LABELS.get(m, m), *(mean_cell(summary[m], k) for k in EXTRA_METRICS)]
            for m in cfg.methods
        ],
    )
    paper = markdown_table(
        ["method", "BraTS identity", "BraTS healthiness", "ISLES identity", "ISLES healthiness"],
        [[LABELS[m], *PAPER[m]] for m in PAPER],
    )
    text = "\n\n".join(
        [
            f"# Table 1 on `data={dataset}` (experiment={cfg.train_experiment})",
            table,
            f"Mean ± std over {next(iter(summary.values()))['identity']['n']} test slices (pathological slices "
            f"of the test volumes). Bold: best mean. *: better than the best baseline in a paired two-sided "
            f"Wilcoxon signed-rank test over the test slices, p < {cfg.alpha}. Healthiness uses f_pre "
            f"(test Dice {f_pre['dice']['mean']:.3f}, Dice loss {1 - f_pre['dice']['mean']:.3f}).",
            "## Beyond the paper (ground truth and anomaly detection)",
            extra,
            "## The paper's Table 1 (Xia et al. 2019)",
            paper,
        ]
    )
    write_text(out / "table1.md", text + "\n")
    write_table(
        out / "table1.csv",
        [
            {
                "dataset": dataset,
                "method": m,
                "metric": k,
                **v,
                "p_vs_best_baseline": sig.get(m, {}).get(k, {}).get("p"),
                "significant": sig.get(m, {}).get(k, {}).get("significant"),
            }
            for m in cfg.methods
            for k, v in summary[m].items()
        ],
    )
    write_json(
        out / "table1.json",
        {
            "dataset": dataset,
            "experiment": cfg.train_experiment,
            "metrics": summary,
            "significance": sig,
            "f_pre": f_pre,
            "f_pre_checkpoint": str(ckpts["segmentor"]),
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
    )
    dm = hydra.utils.instantiate(OmegaConf.create(load_method(ckpts[cfg.methods[0]])[1]["data"]))
    dm.setup("test")
    figure4(out, list(cfg.methods), ckpts, dm, cfg.n_figure)
    print(text)
    print(f"\nwritten: {out / 'table1.md'}, {out / 'figure4.png'}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="reproduce")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
