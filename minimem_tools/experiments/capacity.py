"""Knowledge capacity: facts memorised and bits stored per parameter against total parameters.

Allen-Zhu and Li (Physics of Language Models, part 3.3) find that a transformer trained long enough
on random facts stores about 2 bits per parameter. The memory papers ([PKM] §4, [PEER] §3, [UM] §4,
[UM2] §5) add parameters that a token barely pays for: at equal activated parameters a memory layer
should store several times more than a dense model. In miniature, on the ``facts`` task
(Specification §5; :class:`minimem.data.FactsDataset`: random ``key:value,`` items, the loss on the
value tokens only, so the model can lower it only by storing the table in its weights):

- a small family (2 blocks, width 64, :data:`FAMILY`), so that the whole grid fits a 2-core machine
  in about an hour;
- every other model at the dense model's activated parameters (the widths of
  ``configs/shakespeare-*.yaml`` scaled to width 64, then the FFN width, or the MoE expert width,
  fitted with :func:`~minimem_tools.experiments.setups.match_parameters`), its memory's total size
  swept over :data:`SLOTS` value slots (PKM, PEER, UltraMem, UltraMemV2) or :data:`EXPERTS` experts
  (MoE, top-2);
- all trained with one recipe (:data:`RECIPE`; each memory keeps its paper's value learning rate)
  for one budget of exposures (:data:`FULL`: 1,000 steps of 256 facts, every one of 1,024 facts seen 250 times),
  evaluated ``evals`` times so that the last change of the exact match (``plateau_delta``) and of the
  value loss (``plateau_delta_loss``) says whether the run had stopped moving.

What this budget cannot reach, and why (measured while the experiment was designed, seed 0): Allen-Zhu
and Li's 2 bits per parameter needs about 1,000 exposures of a table larger than the model can hold. The
dense member (102,976 parameters) would hold about 15,000 facts at that rate, so saturating it takes
about 15 million fact-exposures: 60,000 steps of this batch, about 2 CPU-hours here for the dense model
alone, and a memory model with 4 times the parameters needs a table and a step count 4 times larger; the
grid at saturation is hundreds of CPU-hours. Narrower models are no shortcut: at width 32 (26,784
parameters) the dense model learns nothing for the first 750 steps and reaches exact match 0.06 on 2,048
facts after 2,000; at width 16 (7,312) the value loss is still 2.08 nats (uniform: 2.30) after 3,000.
The experiment therefore measures how much each model stores for a fixed number of exposures, the regime
in which the papers train, and reports how far from a plateau each run ended.

Per run: ``exact_match`` (teacher-forced greedy argmax right on every value token: the same answer as
greedy generation), ``facts_memorised`` = exact match x facts, and Allen-Zhu and Li's loss-based
lower bound ``bits_stored`` = sum over facts of max(0, bits_per_fact - CE_bits(value | key)), with
bits_per_fact = value_len log2(value_vocab) and CE_bits the model's cross-entropy of the fact's value
tokens in bits (:func:`fact_scores`, :func:`bits_stored`); ``bits_per_param`` divides it by the total
parameters (``bits_per_nonembedding_param`` by those outside the token embedding); ``exact_match_mean``,
the mean exact match over the evaluations (the area under the learning curve): how early the table is
stored.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from minimem_tools.experiments.runner import Variant, curve, new_figure, save_figure, stat
from minimem_tools.experiments.setups import (
    ACTIVE_KNOBS,
    get,
    match_parameters,
    model_config,
    override,
    parameters,
    train_run,
)

NAME = "capacity"
CLAIM = (
    "Memory layers store several times more facts than dense at equal activated parameters "
    "([PKM] §4, [UM] §4; Allen-Zhu and Li part 3.3: about 2 bits per parameter at saturation; Specification §5)."
)

# The model family: 2 blocks of width 64 (the reference configs have 4 of width 128).
FAMILY = {"model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "model.ffn_hidden": 171}
# Facts: 3-letter keys (17,576 possible) -> 4-digit values, 4 log2(10) = 13.3 bits per fact; the table's
# size is the scale's n_facts (FULL: 1,024 facts, 13,607 bits). Memorising a table starts with a long
# stretch in which nothing is stored and then takes off, later for a larger table: with 2,048 facts no
# model had stored more than 2.5% of them after 1,000 steps (dense and MoE runs, all seeds; PKM's first
# two), so the run measured nothing; with 1,024 the dense model stored 37% to 98% of them.
FACTS = dict(n_facts=1024, key_len=3, value_len=4, key_vocab=26, value_vocab=10)
ITEMS_PER_SEQ = 8  # block_size = 8 items of "kkk:vvvv," - 1 = 71
MODELS = ("dense", "moe", "pkm", "peer", "ultramem", "ultramemv2")
SLOTS = (1024, 4096, 16384)  # N value slots per memory (n = 32, 64, 128 sub-keys per side)
EXPERTS = (4, 8, 16)  # MoE experts E per block, top-2
BASE = {
    "dense": "dense",
    "moe": "moe2",
    "pkm": "pkm",
    "peer": "peer",
    "ultramem": "ultramem",
    "ultramemv2": "ultramemv2",
}
# One recipe for every model (the trainer's defaults otherwise); value_lr_mult and its schedule stay each
# config's own ([PKM]: 4x, UltraMem: 4x decaying to 1x, UltraMemV2: 1x).
RECIPE = {"train.lr": 3e-3, "train.min_lr": 3e-4, "train.weight_decay": 0.1, "train.grad_clip": 1.0}

FULL = dict(steps=1000, batch_size=32, evals=8, eval_iters=8, n_facts=FACTS["n_facts"])
QUICK = dict(steps=4, batch_size=4, evals=2, eval_iters=1, n_facts=256)
TABLE = [
    ("exact_match", ".3f"),
    ("exact_match_mean", ".3f"),
    ("facts_memorised", ",.0f"),
    ("bits_stored", ",.0f"),
    ("bits_per_param", ".3f"),
    ("val_loss", ".3f"),
    ("plateau_delta", "+.3f"),
    ("params_total", ",.0f"),
    ("params_activated", ",.0f"),
]


# --------------------------------------------------------------------------- bits stored


def bits_per_fact(value_len: int, value_vocab: int) -> float:
    """Bits of one uniformly random value: value_len log2(value_vocab)."""
    return value_len * math.log2(value_vocab)


def bits_stored(ce_bits: torch.Tensor, per_fact: float) -> float:
    """Allen-Zhu and Li's loss-based lower bound: sum over facts of max(0, per_fact - CE_bits).

    ``ce_bits`` (F,): each fact's cross-entropy of its value tokens given its key, in bits. A model that
    names a value with certainty stores ``per_fact`` bits of it; one no better than uniform stores none.
    """
    return (per_fact - ce_bits.double()).clamp(min=0).sum().item()


@torch.no_grad()
def fact_scores(model, dataset, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Every fact of ``dataset`` (a FactsDataset) once: ``(ce_bits (F,), exact (F,) bool)``.

    The facts are packed as :meth:`~minimem.data.FactsDataset.evaluate` packs them (``items_per_seq``
    per sequence, fact i at row i // k, item i % k). ce_bits = -sum over the value tokens of
    log2 p(token | key and the value tokens before it); exact = the argmax is right on all of them.
    """
    seqs, n = dataset._eval_sequences(None, None, "val")  # (rows, L), n = F
    pos = dataset.answer_positions  # (A, value_len) indices into y's time axis
    was_training = model.training
    model.eval()
    ce, exact = [], []
    try:
        for i in range(0, len(seqs), batch_size):
            x, y = dataset._finish(seqs[i : i + batch_size])  # (B, T), (B, T)
            out = model(x)
            logits = out[0] if isinstance(out, (tuple, list)) else out  # (B, T, V)
            logp = F.log_softmax(logits.double(), dim=-1)
            token = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T) log p(target)
            ce.append(-token[:, pos].sum(-1).flatten())  # (B * A,) nats per fact
            exact.append((logits.argmax(-1) == y)[:, pos].all(-1).flatten())  # (B * A,)
    finally:
        model.train(was_training)
    return torch.cat(ce)[:n] / math.log(2), torch.cat(exact)[:n]


# --------------------------------------------------------------------------- configs


def name_of(model: str, size: int = 0) -> str:
    if model == "dense":
        return "dense"
    return f"{model}/E={size}" if model == "moe" else f"{model}/N={size}"


def sizes(model: str) -> tuple[int, ...]:
    return (0,) if model == "dense" else EXPERTS if model == "moe" else SLOTS


def block_size() -> int:
    return ITEMS_PER_SEQ * (FACTS["key_len"] + FACTS["value_len"] + 2) - 1


def family(model: str) -> dict:
    """``model``'s reference config scaled to :data:`FAMILY` (memory widths scaled with the width)."""
    from minimem.data import get_dataset

    h = FAMILY["model.n_embd"]
    fields = dict(FAMILY)
    fields["model.block_size"] = block_size()
    fields["model.vocab_size"] = get_dataset("facts", block_size(), 0, **FACTS).vocab_size
    if model in ("pkm", "peer"):
        fields.update({"model.memory.d_key": h // 2})  # [UM2]'s D_k = h/2 (the reference fits D_k instead)
    if model == "pkm":
        fields["model.memory.d_value"] = h
    if model == "ultramem":  # one skip-layer memory: read before block 0, added after block 1
        fields.update({"model.memory.skip": [[0, 1]], "model.memory.d_key": h // 2, "model.memory.d_value": h // 2})
    if model == "ultramemv2":  # D_v + D_p = h/2, D_p : D_v = 1 : 3
        fields.update({"model.memory.d_key": h // 2, "model.memory.d_value": 3 * h // 8, "model.memory.d_pre": h // 8})
    return override(model_config(BASE[model]), **fields)


@functools.lru_cache(maxsize=1)
def _configs_json() -> str:
    dense = family("dense")
    target = parameters(dense)["activated"]
    out = [["dense", 0, dense]]
    for model in MODELS[1:]:
        base = family(model)
        for size in sizes(model):
            knob = "model.moe.n_experts" if model == "moe" else "model.memory.n_slots"
            config = override(base, **{knob: size})
            active = ACTIVE_KNOBS[BASE[model]]
            config = match_parameters(config, active, target, "activated", start=get(config, active))
            out.append([model, size, config])
    return json.dumps(out)


def model_configs() -> list[tuple[str, int, dict]]:
    """(model, size, model config at the dense model's activated parameters); fitted once per process."""
    return [tuple(row) for row in json.loads(_configs_json())]


def task_config(config: dict, quick: bool) -> dict:
    scale = QUICK if quick else FULL
    steps = scale["steps"]
    facts = dict(FACTS, n_facts=scale["n_facts"])
    fields = {
        "train.max_steps": steps,
        "train.warmup_steps": max(1, steps // 10),
        "train.eval_interval": max(1, steps // scale["evals"]),
        "train.ckpt_interval": steps,
        "train.eval_iters": scale["eval_iters"],
        "train.log_interval": max(1, steps // 20),
        "train.batch_size": scale["batch_size"],
        "train.threads": 1,
        "train.device": "cpu",
        "train.dataset": "facts",
        "train.dataset_args": facts,
        **RECIPE,
    }
    return override(config, **fields)


def variants(quick: bool) -> list[Variant]:
    return [
        Variant(name_of(model, size), task_config(config, quick), labels={"model": model, "size": size})
        for model, size, config in model_configs()
    ]


# --------------------------------------------------------------------------- one run


def run(variant: Variant, seed: int, quick: bool) -> dict:
    from minimem.train import TrainingDiverged
    from minimem_tools.experiments.setups import dataset_of

    counts = parameters(variant.config)
    metrics = dict(
        params_total=counts["total"],
        params_activated=counts["activated"],
        params_nonembedding=counts["total"] - counts["by_part"]["embedding"],
    )
    try:
        result, records = train_run(variant.config)
    except TrainingDiverged:
        nan = math.nan
        metrics.update(diverged=1, exact_match=0.0, facts_memorised=0.0, bits_stored=0.0, bits_per_param=0.0)
        metrics.update(val_loss=nan, train_loss=nan, plateau_delta=nan, plateau_delta_loss=nan)
        return metrics
    dataset = dataset_of(variant.config)
    ce_bits, exact = fact_scores(result.model, dataset)
    per_fact = bits_per_fact(dataset.value_len, dataset.value_vocab)
    stored = bits_stored(ce_bits, per_fact)
    evals = [r for r in records if "exact_match" in r]
    metrics.update(
        diverged=int(not math.isfinite(result.val_loss)),
        train_loss=result.train_loss,
        val_loss=result.val_loss,  # cross-entropy per value token, nats
        exact_match=exact.float().mean().item(),
        facts_memorised=exact.sum().item(),
        n_facts=dataset.n_facts,
        exposures_per_fact=get(variant.config, "train.max_steps")
        * get(variant.config, "train.batch_size")
        * dataset.items_per_seq
        / dataset.n_facts,
        bits_per_fact=per_fact,
        ce_bits_per_fact=ce_bits.mean().item(),
        bits_stored=stored,
        bits_stored_unclipped=max(0.0, (per_fact - ce_bits.double()).sum().item()),
        bits_per_param=stored / counts["total"],
        bits_per_nonembedding_param=stored / metrics["params_nonembedding"],
        bits_per_activated_param=stored / counts["activated"],
        # the last change between the final two evaluations: near 0 on a plateau
        plateau_delta=evals[-1]["exact_match"] - evals[-2]["exact_match"] if len(evals) > 1 else math.nan,
        plateau_delta_loss=evals[-1]["val_loss"] - evals[-2]["val_loss"] if len(evals) > 1 else math.nan,
        # the mean over the evaluations, the area under the learning curve: how early the table is stored
        exact_match_mean=sum(r["exact_match"] for r in evals) / len(evals) if evals else math.nan,
    )
    for r in evals:  # the curve, one metric per evaluation step
        metrics[f"exact_match_at_{r['step']}"] = r["exact_match"]
        metrics[f"val_loss_at_{r['step']}"] = r["val_loss"]
    return metrics


# --------------------------------------------------------------------------- findings


def _best_size(result: dict, model: str) -> int:
    """The size of ``model`` with the most bits stored (mean over seeds)."""
    stored = {s: stat(result, name_of(model, s), "bits_stored")[0] for s in sizes(model)}
    finite = {s: v for s, v in stored.items() if not math.isnan(v)}
    return max(finite, key=finite.get) if finite else sizes(model)[0]


def notes(result: dict) -> list[str]:
    from minimem_tools.experiments.claims import decision_bar

    dense = {m: stat(result, "dense", m) for m in ("bits_stored", "facts_memorised", "bits_per_param")}
    if dense["bits_stored"][2] == 0:
        return []
    exposures = next(
        (r["metrics"]["exposures_per_fact"] for r in result["runs"] if "exposures_per_fact" in r["metrics"]), 0
    )
    lines = [
        f"every fact seen {exposures:,.0f} times in training (Allen-Zhu and Li's 2 bits/param: about 1,000)",
        f"dense: {dense['facts_memorised'][0]:,.0f} facts ({dense['bits_stored'][0]:,.0f} bits, "
        f"{dense['bits_per_param'][0]:.3f} bits/param; Allen-Zhu and Li's saturation: about 2)",
    ]
    for model in MODELS[1:]:
        for size in sizes(model):
            name = name_of(model, size)
            a = stat(result, name, "bits_stored")
            if a[2] == 0:
                continue
            bar = decision_bar(a, dense["bits_stored"]) if min(a[2], dense["bits_stored"][2]) > 1 else math.nan
            gain = a[0] - dense["bits_stored"][0]
            verdict = (
                "inconclusive (1 seed)"
                if math.isnan(bar)
                else "beats dense"
                if gain > bar
                else ("below dense" if -gain > bar else "within 2 SE of dense")
            )
            ratio = f"{a[0] / dense['bits_stored'][0]:.2f}x" if dense["bits_stored"][0] > 0 else "n/a (dense 0)"
            best = " (best size)" if size == _best_size(result, model) else ""
            lines.append(
                f"{name}{best}: {stat(result, name, 'facts_memorised')[0]:,.0f} facts, {a[0]:,.0f} ± {a[1]:,.0f} bits, "
                f"{stat(result, name, 'bits_per_param')[0]:.3f} bits/param; memory/dense bits {ratio}, "
                f"gain {gain:+,.0f} vs decision bar {bar:,.0f} (2 SE): {verdict}"
            )
    moves = [
        abs(stat(result, e["name"], "plateau_delta")[0])
        for e in result["summary"]
        if not math.isnan(stat(result, e["name"], "plateau_delta")[0])
    ]
    if moves:
        lines.append(
            f"plateau: the largest change of exact match between the last two evaluations is {max(moves):.3f} "
            "(mean over seeds, any run)"
        )
    return lines


def plot(result: dict, out_dir: Path) -> list[Path]:
    fig, axes = new_figure(ncols=3, width=4.2)
    draw(result, axes)
    return save_figure(fig, out_dir, NAME)


def draw(result: dict, axes) -> None:
    """The three panels (chapter 8 draws them too): facts memorised and bits per parameter against total
    parameters, and each model's learning curve at its largest size."""
    ax_f, ax_b, ax_c = axes
    for ax, metric in ((ax_f, "facts_memorised"), (ax_b, "bits_per_param")):
        for model in MODELS:
            names = [name_of(model, s) for s in sizes(model)]
            xs = [stat(result, n, "params_total")[0] for n in names]
            ys = [stat(result, n, metric) for n in names]
            style = dict(marker="s", color="black", linestyle="none") if model == "dense" else dict(marker="o")
            ax.errorbar(xs, [y[0] for y in ys], yerr=[y[1] for y in ys], capsize=3, label=model, **style)
        ax.set_xscale("log")
        ax.set_xlabel("total parameters")
    n_facts = next((r["metrics"].get("n_facts") for r in result["runs"] if "n_facts" in r["metrics"]), None)
    if n_facts:
        ax_f.axhline(n_facts, color="grey", linestyle=":", linewidth=1, label="all facts")
    ax_f.set_ylabel("facts memorised (exact match x facts)")
    ax_f.set_title("facts memorised at equal activated parameters", fontsize=9)
    ax_b.axhline(2.0, color="grey", linestyle="--", linewidth=1, label="2 bits/param (Allen-Zhu & Li)")
    ax_b.set_yscale("log")
    ax_b.set_ylabel("bits stored per parameter")
    ax_b.set_title("bits per parameter (loss-based lower bound)", fontsize=9)
    steps = sorted(
        {int(k.rsplit("_", 1)[1]) for r in result["runs"] for k in r["metrics"] if k.startswith("exact_match_at_")}
    )
    for model in MODELS:  # each model at its largest size: is it still climbing?
        name = name_of(model, sizes(model)[-1])
        curve(ax_c, result, name, [f"exact_match_at_{t}" for t in steps], steps, name)
    ax_c.set_xlabel("step")
    ax_c.set_ylabel("exact match")
    ax_c.set_title("learning curves (largest size of each model)", fontsize=9)
    for ax in (ax_f, ax_b, ax_c):
        ax.legend(fontsize=7)
