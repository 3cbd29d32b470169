"""In-context memory: associative recall and multi-round memorisation against context length ([UM2] §5).

[UM2] reports its largest gains over the MoE (OLMoE) on long-context memory tasks: key-value
retrieval +15.8, multi-round memorising +6.2. In miniature: MoE-8 (top-8 of 64 experts, the
OLMoE shape) and UltraMemV2, both at the dense reference's activated parameters, trained
from scratch on each task at context lengths L in {32, 64, 128}, scored by exact match on
the held-out episodes (:mod:`minimem.data`). The tasks grow with L so that the context is
full:

- ``recall`` (MQAR): n_pairs = L / 6.4 pairs (5, 10, 20), 40% of them queried;
- ``multiround``: 3 facts, then 2 rounds of distractor text of length (L - 11) / 2 - 9
  followed by 2 queries: longer context = facts further back.
"""

from __future__ import annotations

import math
from pathlib import Path

from minimem_tools.experiments.runner import Variant, errorbar, new_figure, save_figure, stat
from minimem_tools.experiments.setups import experiment_train, model_config, override, train_and_measure

NAME = "in_context"
CLAIM = (
    "UltraMemV2 beats the MoE on in-context memory tasks, increasingly with context length "
    "([UM2] §5: key-value retrieval +15.8, multi-round memorising +6.2 at 32K)."
)
MODELS = ("moe8", "ultramemv2")
TASKS = ("recall", "multiround")
CONTEXTS = (32, 64, 128)
FULL = dict(steps=400, eval_iters=10, lr=3e-3)
QUICK = dict(steps=3, eval_iters=1, lr=3e-3)
TOKENS_PER_STEP = 768  # batch x context held at the reference's 12 x 64: shorter contexts see more episodes
TABLE = [("exact_match", ".3f"), ("val_loss", ".3f")]


def task_args(task: str, context: int) -> dict:
    """Dataset arguments that fill a context of ``context`` tokens."""
    if task == "recall":
        pairs = max(2, round(context / 6.4))
        return dict(n_pairs=pairs, n_queries=max(1, round(0.4 * pairs)))
    if task == "multiround":
        facts, rounds, queries = 3, 2, 2
        facts_len, query_len = 4 * facts, 4 * queries
        distractor = (context + 1 - facts_len) // rounds - 1 - query_len
        if distractor < 0:
            raise ValueError(
                f"context={context} is too short for the multiround task "
                f"(needs >= {facts_len + rounds * (1 + query_len) - 1})"
            )
        return dict(n_facts=facts, n_rounds=rounds, n_queries=queries, distractor_len=distractor)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def name_of(model: str, task: str, context: int) -> str:
    return f"{model}/{task}/L={context}"


def variants(quick: bool) -> list[Variant]:
    from minimem.data import get_dataset

    scale = QUICK if quick else FULL
    out = []
    for task in TASKS:
        for model in MODELS:
            base = model_config(model)
            for context in CONTEXTS:
                args = task_args(task, context)
                vocab = get_dataset(task, context, 0, **args).vocab_size
                config = override(base, **{"model.block_size": context, "model.vocab_size": vocab})
                config = experiment_train(
                    config,
                    scale["steps"],
                    scale["eval_iters"],
                    dataset=task,
                    dataset_args=args,
                    lr=scale["lr"],
                    batch_size=max(1, TOKENS_PER_STEP // context),
                )
                out.append(
                    Variant(
                        name_of(model, task, context), config, labels={"model": model, "task": task, "context": context}
                    )
                )
    return out


def run(variant: Variant, seed: int, quick: bool) -> dict:
    metrics, _ = train_and_measure(variant.config, exact_match=True)
    return metrics


def notes(result: dict) -> list[str]:
    lines = []
    for task in TASKS:
        for context in CONTEXTS:
            moe = stat(result, name_of("moe8", task, context), "exact_match")
            um = stat(result, name_of("ultramemv2", task, context), "exact_match")
            if math.isnan(moe[0]) or math.isnan(um[0]):
                continue
            lines.append(
                f"{task} L={context}: UltraMemV2 {um[0]:.3f} ± {um[1]:.3f} vs MoE-8 {moe[0]:.3f} ± {moe[1]:.3f} "
                f"(UltraMemV2 - MoE = {100 * (um[0] - moe[0]):+.1f} points)"
            )
    return lines


def plot(result: dict, out_dir: Path) -> list[Path]:
    fig, axes = new_figure(ncols=len(TASKS))
    for ax, task in zip(axes, TASKS):
        for model in MODELS:
            errorbar(
                ax, result, [name_of(model, task, c) for c in CONTEXTS], "exact_match", list(CONTEXTS), label=model
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length L (tokens)")
        ax.set_ylabel("exact match")
        ax.set_ylim(0, 1.02)
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=8)
    return save_figure(fig, out_dir, NAME)
