"""Initialisation and stability of UltraMemV2's value tables ([UM2] App. A, Specification §4.4).

[UM2]: without the principled initialisation training is "very prone to divergence"; the
official code uses std 0.02 for the value tables. Here: ``memory.value_init`` in
{principled, std0.02, naive (N(0, 1))} at the config's learning rate and at a raised one,
over the seeds. A run *diverges* when its loss becomes non-finite (the trainer stops it) or
when it ends no better than the uniform guess (validation loss >= ln V). The largest
gradient norm seen at a logging step is reported as an early sign of instability.
"""

from __future__ import annotations

import math
from pathlib import Path

from minimem_tools.experiments.runner import Variant, new_figure, save_figure, stat
from minimem_tools.experiments.setups import (
    experiment_train,
    model_config,
    override,
    train_run,
)

NAME = "init_stability"
CLAIM = (
    "UltraMemV2's principled value initialisation prevents divergence that std 0.02 or a naive init "
    "suffer, at a normal and a raised learning rate ([UM2] App. A)."
)
INITS = ("principled", "std0.02", "naive")
LEARNING_RATES = {"normal": 1.0e-3, "raised": 1.0e-2}
FULL = dict(steps=300, eval_iters=20)
QUICK = dict(steps=3, eval_iters=1)
TABLE = [("diverged", ".2f"), ("val_loss", ".3f"), ("max_grad_norm", ".3g"), ("init_value_std", ".3g")]


def name_of(init: str, lr_name: str) -> str:
    return f"{init}/lr={lr_name}"


def variants(quick: bool) -> list[Variant]:
    scale = QUICK if quick else FULL
    base = model_config("ultramemv2")
    out = []
    for lr_name, lr in LEARNING_RATES.items():
        for init in INITS:
            config = override(base, **{"model.memory.value_init": init})
            config = experiment_train(config, scale["steps"], scale["eval_iters"], lr=lr)
            out.append(Variant(name_of(init, lr_name), config, labels={"init": init, "lr": lr_name}))
    return out


def run(variant: Variant, seed: int, quick: bool) -> dict:
    from minimem.train import TrainingDiverged

    config = variant.config
    metrics = {}
    try:
        result, records = train_run(config)
    except TrainingDiverged as err:
        records = getattr(err, "records", [])
        metrics.update(diverged=1, val_loss=math.nan, train_loss=math.nan)
        model = None
    else:
        model = result.model
        uniform = math.log(model.config.vocab_size)
        bad = not (math.isfinite(result.val_loss) and result.val_loss < uniform)
        metrics.update(diverged=int(bad), val_loss=result.val_loss, train_loss=result.train_loss)
    norms = [r["grad_norm"] for r in records if "grad_norm" in r]
    metrics["max_grad_norm"] = max(norms) if norms else math.nan
    metrics["init_value_std"] = _init_value_std(config)
    return metrics


def _init_value_std(config: dict) -> float:
    """sigma_V that ``memory.value_init`` gives the first memory layer (built with the run's seed)."""
    import torch

    from minimem.config import config_from_dict
    from minimem.model import GPT

    torch.manual_seed(config["train"]["seed"])
    model = GPT(config_from_dict(config).model)
    return float(model.blocks[0].memory.value_std)


def notes(result: dict) -> list[str]:
    lines = []
    for lr_name, lr in LEARNING_RATES.items():
        parts = []
        for init in INITS:
            d = stat(result, name_of(init, lr_name), "diverged")
            n = sum(1 for r in result["runs"] if r["name"] == name_of(init, lr_name))
            parts.append(f"{init} {d[0] * n:.0f}/{n}" if not math.isnan(d[0]) else f"{init} n/a")
        lines.append(f"lr {lr:g} ({lr_name}): diverged runs " + ", ".join(parts))
    return lines


def plot(result: dict, out_dir: Path) -> list[Path]:
    fig, (ax_d, ax_l) = new_figure(ncols=2)
    width = 0.38
    for k, lr_name in enumerate(LEARNING_RATES):
        pos = [i + (k - 0.5) * width for i in range(len(INITS))]
        div = [stat(result, name_of(i, lr_name), "diverged") for i in INITS]
        ax_d.bar(pos, [d[0] for d in div], width, label=f"lr {LEARNING_RATES[lr_name]:g}")
        loss = [stat(result, name_of(i, lr_name), "val_loss") for i in INITS]
        ax_l.bar(
            pos,
            [s[0] for s in loss],
            width,
            yerr=[s[1] for s in loss],
            capsize=3,
            label=f"lr {LEARNING_RATES[lr_name]:g}",
        )
    for ax in (ax_d, ax_l):
        ax.set_xticks(range(len(INITS)))
        ax.set_xticklabels(INITS)
        ax.legend(fontsize=8)
    ax_d.set_ylim(0, 1.05)
    ax_d.set_ylabel("divergence rate over seeds")
    ax_l.set_ylabel("validation loss (runs that did not diverge)")
    ax_d.set_title("divergence (non-finite loss or no better than uniform)", fontsize=9)
    ax_l.set_title("final validation loss", fontsize=9)
    return save_figure(fig, out_dir, NAME)
