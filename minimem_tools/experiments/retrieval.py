"""Retrieval quality: TDQKR's recall of the exact top-m over training, and what it costs in loss.

UltraMemV2 (``configs/shakespeare-ultramemv2.yaml``) selects its m slots with TDQKR ([UM] §3.1):
top-m rows by the rank-1 factor u^T S_row, top-m columns by t^T S_col, the m x m grid rescored
with the full Tucker core. That is exact only while the core is rank 1 and the factor scores are
non-negative; chapter 5 measures that after training it finds a fraction of the exact top-m.
Here, 500 steps each (the machine's budget), recall measured at initialisation and every 100 steps on one fixed
validation batch (:func:`minimem.ultramem.retrieval_recall`, the mean over layers of the fraction
of the exact top-m slots the layer's search finds):

- ``tdqkr``: the reference config;
- ``exact``: the exact top-m of the full Tucker score over all N slots (``search: exact``), the
  same model otherwise: the loss TDQKR costs is ``tdqkr - exact``;
- ``signed``: the top-m and the bottom-m of each side (a 2m x 2m grid, ``search: signed``): a slot
  whose two factor scores are both negative has a large positive product, which top-m alone misses.
  (A larger top-M grid, ``candidates``, barely helps: on random signed scores about half the exact
  top-m slots have both factor scores negative, at the bottom of both rankings.)
- ``sign=continuous``: the rank-1 factors (u, t) keep their sign between refreshes, as the
  official code does (``rank1_sign: continuous``).

And the two options of the official code that minimem adds, each measured once (3 seeds):
``share_ratio=2`` (the sliding-window ring sharing: one table of L N / 2 rows, layer l reads the
N rows from l N / 2) and ``rmsnorm`` (RMSNorm query and key norms, ``qk_norm: rmsnorm``).
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path

import torch

from minimem_tools.experiments.runner import Variant, bar_chart, curve, new_figure, save_figure, stat
from minimem_tools.experiments.setups import dataset_of, experiment_train, model_config, override, parameters

NAME = "retrieval"
CLAIM = (
    "UltraMemV2's TDQKR search: recall of the exact top-m over training and its cost in validation loss "
    "against the exact top-m, with the fixes the papers and the official code offer ([UM] §3.1)."
)
FULL = dict(steps=500, eval_iters=40, every=100)
QUICK = dict(steps=4, eval_iters=1, every=2)
VARIANTS = {  # name -> fields of model.memory
    "tdqkr": {},
    "exact": {"search": "exact"},
    "signed": {"search": "signed"},
    "sign=continuous": {"rank1_sign": "continuous"},
    "share_ratio=2": {"share_ratio": 2, "ring_group": 1},
    "rmsnorm": {"qk_norm": "rmsnorm"},
}
TABLE = [
    ("val_loss", ".3f"),
    ("recall", ".3f"),
    ("recall_min", ".3f"),
    ("recall_0", ".3f"),
    ("params_total", ",.0f"),
]
RECALL_BATCH = 8  # validation sequences the recall is measured on (8 x 64 tokens)


def variants(quick: bool) -> list[Variant]:
    scale = QUICK if quick else FULL
    base = model_config("ultramemv2")
    out = []
    for name, fields in VARIANTS.items():
        config = override(base, **{f"model.memory.{k}": v for k, v in fields.items()})
        config = experiment_train(config, scale["steps"], scale["eval_iters"])
        out.append(Variant(name, config, labels={"variant": name}, task={"every": scale["every"]}))
    return out


def run(variant: Variant, seed: int, quick: bool) -> dict:
    """Train in chunks of ``every`` steps (stop + resume: bit-identical to one run) and measure the
    recall on a fixed validation batch at initialisation and after every chunk."""
    from minimem.config import config_from_dict
    from minimem.model import GPT
    from minimem.train import TrainingDiverged, train
    from minimem.ultramem import retrieval_recall

    every, steps = variant.task["every"], variant.config["train"]["max_steps"]
    batch, _ = dataset_of(variant.config).get_batch("val", RECALL_BATCH, torch.Generator().manual_seed(1234))
    metrics: dict = {}
    with tempfile.TemporaryDirectory(prefix="minimem-retrieval-") as tmp:
        config = override(variant.config, **{"train.out_dir": tmp})
        cfg = config_from_dict(config)
        metrics["recall_0"] = retrieval_recall(_initial_model(cfg, GPT), batch)
        result = None
        try:
            for stop in range(every, steps + every, every):
                with contextlib.redirect_stdout(io.StringIO()):
                    result = train(cfg, resume=stop > every, stop_at=min(stop, steps), progress=False)
                metrics[f"recall_{min(stop, steps)}"] = retrieval_recall(result.model, batch)
        except TrainingDiverged:
            metrics.update(diverged=1, val_loss=math.nan, train_loss=math.nan)
            return metrics
    counts = parameters(variant.config)
    recalls = [v for k, v in metrics.items() if k.startswith("recall_")]
    metrics.update(
        diverged=0,
        val_loss=result.val_loss,
        train_loss=result.train_loss,
        recall=metrics[f"recall_{steps}"],
        recall_min=min(recalls),
        params_total=counts["total"],
        params_activated=counts["activated"],
    )
    return metrics


def _initial_model(cfg, gpt_class):
    from minimem.train import seed_everything

    seed_everything(cfg.train.seed)  # as train() does before building the model: the same initial weights
    return gpt_class(cfg.model)


def recall_steps(result: dict) -> list[int]:
    keys = {k for r in result["runs"] for k in r["metrics"] if k.startswith("recall_") and k[7:].isdigit()}
    return sorted(int(k[7:]) for k in keys)


def notes(result: dict) -> list[str]:
    lines = []
    tdqkr, exact = stat(result, "tdqkr", "val_loss"), stat(result, "exact", "val_loss")
    if not (math.isnan(tdqkr[0]) or math.isnan(exact[0])):
        lines.append(
            f"the loss TDQKR costs (tdqkr - exact top-m): {tdqkr[0] - exact[0]:+.3f} "
            f"(tdqkr {tdqkr[0]:.3f} ± {tdqkr[1]:.3f}, exact {exact[0]:.3f} ± {exact[1]:.3f})"
        )
    for name in VARIANTS:
        r0, r1 = stat(result, name, "recall_0"), stat(result, name, "recall")
        loss = stat(result, name, "val_loss")
        if not math.isnan(r1[0]):
            lines.append(
                f"{name}: recall {r0[0]:.2f} at initialisation -> {r1[0]:.2f} ± {r1[1]:.2f} after training "
                f"(lowest {stat(result, name, 'recall_min')[0]:.2f}); val loss {loss[0]:.3f} ± {loss[1]:.3f}"
            )
    return lines


def plot(result: dict, out_dir: Path) -> list[Path]:
    fig, (ax_recall, ax_loss) = new_figure(ncols=2, width=5.0, height=3.6)
    steps = recall_steps(result)
    for name in VARIANTS:
        if name == "exact":
            continue  # its search is the exact top-m: recall 1 by definition
        curve(ax_recall, result, name, [f"recall_{s}" for s in steps], steps, name)
    ax_recall.set_ylim(0, 1.05)
    ax_recall.set_xlabel("training step")
    ax_recall.set_ylabel("recall of the exact top-m")
    ax_recall.legend(fontsize=7)
    ax_recall.set_title("TDQKR recall over training (mean ± std over seeds)", fontsize=9)
    bar_chart(ax_loss, result, list(VARIANTS), "val_loss")
    finite = [stat(result, n, "val_loss")[0] for n in VARIANTS]
    finite = [v for v in finite if not math.isnan(v)]
    if finite:
        ax_loss.set_ylim(min(finite) - 0.03, max(finite) + 0.03)
    ax_loss.set_title("validation loss after 500 steps", fontsize=9)
    return save_figure(fig, out_dir, NAME)
