"""``minimem bench decode``: decoding speed and weights read per generated token, at equal total parameters.

    minimem bench decode [--batch 1 8 64] [--tokens 32] [--prompt 16] [--repeats 3] [--threads 1] [--quick]

Inference as the papers measure it ([UM], [UM2]): B sequences decode together, one token
each per step, with a KV cache (:mod:`minimem.generate`). Three models of one TOTAL parameter count:

- ``moe-8``: ``configs/shakespeare-moe.yaml`` (8 SwiGLU experts, top-2; activates about the dense
  reference's 800k parameters);
- ``dense``: ``configs/shakespeare-dense.yaml`` with the FFN widened until its total is the MoE's;
- ``ultramemv2``: ``configs/shakespeare-ultramemv2.yaml`` (activates about 800k too) with the value
  tables grown (N = n^2 rows per layer) until its total is the MoE's.

Each model prefills a shakespeare prompt of ``--prompt`` tokens for each of B sequences (not timed),
then decodes ``--tokens`` tokens per sequence (timed: the forward of one token per sequence and the
sampling, temperature 1). tokens/s = B x tokens / time. Fairness on a shared machine: every round
decodes every (batch, model) once, the model order reversed every other round, and each figure is
the median over ``--repeats`` rounds, so load from other processes hits all models alike.

Weight bytes read per generated token, exact for the run: in each decode step of B tokens, count the
weights the step actually touched, measured from that step's routing (``last_indices``): every dense
weight (attention, norms, the tied embedding the output head multiplies by, routers, the memory
layers' queries, keys, cores and projections; an untied input table only in the rows looked up), the
union of the experts the B tokens selected in each MoE layer, and the union of the value-table rows
they read in each memory table (a table several layers share counted once). Divided by B and averaged
over the steps. Reads of the KV cache are not weights (the same attention in all three models) and
are not counted. The models are freshly initialised: trained routers spread their load differently.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from minimem_tools import course

MODELS = ("dense", "moe-8", "ultramemv2")
SEED = 1337


# ----------------------------------------------------------------------------- equal total parameters


def matched_configs() -> dict:
    """{name: ModelConfig} of the three models, each total as close as possible to the MoE's."""
    from minimem.accounting import analytic_parameters
    from minimem.config import load_config

    def load(kind: str, overrides=()):
        return load_config(course.path(f"configs/shakespeare-{kind}.yaml"), list(overrides)).model

    moe = load("moe")
    target = analytic_parameters(moe)["total"]
    dense = load("dense")
    per_unit = 3 * dense.n_embd * dense.n_layer  # SwiGLU parameters per unit of ffn_hidden
    hidden = dense.ffn_hidden + round((target - analytic_parameters(dense)["total"]) / per_unit)
    dense = load("dense", [f"model.ffn_hidden={hidden}"])

    def ultramemv2(n: int):
        return load("ultramemv2", [f"model.memory.n_slots={n * n}"])

    n = math.isqrt(load("ultramemv2").memory.n_slots)
    while analytic_parameters(ultramemv2(n + 1))["total"] <= target:
        n += 1
    below, above = (analytic_parameters(ultramemv2(k))["total"] for k in (n, n + 1))
    um2 = ultramemv2(n if target - below <= above - target else n + 1)
    return {"dense": dense, "moe-8": moe, "ultramemv2": um2}


# ----------------------------------------------------------------------------- weights touched


def touched_bytes(model, tokens: torch.Tensor) -> int:
    """Bytes of weights the model's last forward, over the token ids ``tokens``, touched (module docstring).

    Reads ``last_indices`` of every MoE and memory layer, so call it right after that forward.
    """
    from minimem.accounting import access_structure, memory_modules, moe_modules

    s = access_structure(model)
    config = model.config
    elements = s.dense
    if not config.tie_embeddings:  # the input table: only the rows looked up
        elements += (tokens.unique().numel() - config.vocab_size) * config.n_embd
    for module, layer in zip(moe_modules(model), s.moe):
        elements += module.last_indices.unique().numel() * layer.per_expert
    tables: dict[int, tuple[int, list]] = {}  # one entry per value table, shared ones once
    for module, layer in zip(memory_modules(model), s.memory):
        if layer.table is not None:
            width, rows = tables.setdefault(id(getattr(module, "table", module)), (layer.table.width, []))
            rows.append(module.last_indices.reshape(-1))
    elements += sum(width * torch.cat(rows).unique().numel() for width, rows in tables.values())
    return elements * model.lm_head.weight.element_size()


# ----------------------------------------------------------------------------- decoding


class Decoder:
    """One model in eval mode; ``decode`` times a cached decode of B prompts."""

    def __init__(self, name: str, config):
        from minimem.accounting import count_parameters
        from minimem.model import GPT

        torch.manual_seed(SEED)
        self.name, self.model = name, GPT(config).eval()
        counts = count_parameters(self.model)
        self.total, self.activated = counts["total"], counts["activated"]

    @torch.no_grad()
    def decode(self, prompts: torch.Tensor, tokens: int, count: bool = False) -> tuple[float, list[float]]:
        """(seconds of the ``tokens`` decode steps, weight bytes per token of each step if ``count``)."""
        from minimem.generate import next_token_probabilities
        from minimem.model import KVCache

        model, B = self.model, prompts.shape[0]
        generator = torch.Generator().manual_seed(SEED)
        cache = KVCache(model.config, B)
        logits, _ = model(prompts, cache=cache)  # prefill, not timed
        token = torch.multinomial(next_token_probabilities(logits[:, -1]), 1, generator=generator)
        per_token, seconds = [], 0.0
        for _ in range(tokens):
            start = time.perf_counter()
            logits, _ = model(token, cache=cache)
            seconds += time.perf_counter() - start
            if count:
                per_token.append(touched_bytes(model, token) / B)
            start = time.perf_counter()
            token = torch.multinomial(next_token_probabilities(logits[:, -1]), 1, generator=generator)
            seconds += time.perf_counter() - start
        return seconds, per_token


def prompts_of(batch: int, length: int) -> torch.Tensor:
    """``batch`` windows of ``length`` tokens of the shakespeare train split (fixed seed)."""
    from minimem.data import get_dataset

    dataset = get_dataset("shakespeare", length, SEED)
    return dataset.get_batch("train", batch, torch.Generator().manual_seed(SEED))[0]


def run(configs: dict, batches: list[int], tokens: int, prompt: int, repeats: int) -> list[dict]:
    """One row per (batch, model): tokens/s (median over interleaved rounds) and weight bytes per token."""
    from tqdm.auto import tqdm

    decoders = [Decoder(name, config) for name, config in configs.items()]
    all_prompts = prompts_of(max(batches), prompt)
    bytes_per_token = {}
    for B in batches:  # untimed pass: the byte counts (and a warm-up)
        for d in decoders:
            bytes_per_token[B, d.name] = statistics.fmean(d.decode(all_prompts[:B], tokens, count=True)[1])
    times = {key: [] for key in bytes_per_token}
    with tqdm(total=repeats * len(times), desc="bench decode", unit="run", leave=False) as bar:
        for r in range(repeats):
            for B in batches:
                for d in decoders if r % 2 == 0 else decoders[::-1]:
                    times[B, d.name].append(d.decode(all_prompts[:B], tokens)[0])
                    bar.update()
    rows = []
    for B in batches:
        for d in decoders:
            rows.append(
                dict(
                    model=d.name,
                    total=d.total,
                    activated=d.activated,
                    batch=B,
                    tokens_per_s=B * tokens / statistics.median(times[B, d.name]),
                    bytes_per_token=bytes_per_token[B, d.name],
                )
            )
    return rows


def print_table(rows: list[dict], tokens: int, prompt: int, repeats: int, threads: int) -> None:
    print(
        f"decode {tokens} tokens after a {prompt}-token prompt, {threads} thread(s), "
        f"median of {repeats} interleaved round(s), load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    header = (
        f"{'model':<11} {'total':>10} {'activated':>10} {'batch':>5} {'tokens/s':>9} {'x dense':>7} "
        f"{'weight KB/token':>15} {'x dense':>7}"
    )
    print(header)
    print("-" * len(header))
    dense = {r["batch"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        base = dense[r["batch"]]
        print(
            f"{r['model']:<11} {r['total']:>10,} {r['activated']:>10,} {r['batch']:>5} {r['tokens_per_s']:>9.0f} "
            f"{r['tokens_per_s'] / base['tokens_per_s']:>7.2f} {r['bytes_per_token'] / 1e3:>15.1f} "
            f"{r['bytes_per_token'] / base['bytes_per_token']:>7.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    from minimem.config import MAX_THREADS
    from minimem_tools.cli import ArgumentParser

    parser = ArgumentParser(prog="minimem bench decode", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64], help="sequences decoded together")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per sequence (timed)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence (prefill, not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (the median is taken over them)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: 4 tokens, 8-token prompts, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.prompt, args.repeats = 4, 8, 1
    for name in ("tokens", "prompt", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.batch):
        parser.error(f"--batch sizes must all be >= 1, got {args.batch}")
    if not 1 <= args.threads <= MAX_THREADS:
        parser.error(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    configs = matched_configs()
    block_size = min(config.block_size for config in configs.values())
    if args.prompt + args.tokens > block_size:
        parser.error(
            f"--prompt {args.prompt} + --tokens {args.tokens} must be <= the models' block_size {block_size} "
            "(past it, decoding recomputes the window instead of using the cache)"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = run(configs, sorted(set(args.batch)), args.tokens, args.prompt, args.repeats)
    finally:
        torch.set_num_threads(threads)
    print_table(rows, args.tokens, args.prompt, args.repeats, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
