"""``minimem bench step``: CPU training-step time of every layer kind against the dense model.

    minimem bench step [--steps 5] [--repeats 7] [--threads 1 2] [--configs dense ultramemv2 ...]
    minimem bench step --profile ultramemv2 [--threads 1]

Builds the six reference configs (``configs/shakespeare-{dense,moe,pkm,peer,ultramem,
ultramemv2}.yaml``; the memory configs have the dense model's activated parameters, the MoE
too) and times the trainer's own step (:func:`minimem.train.training_step`: forward,
backward, gradient clipping, AdamW, ``after_optimizer_step``) on one fixed batch.

Fairness on a shared machine: the models are timed round-robin, ``--steps`` steps of each
per round, ``--repeats`` rounds, and each model's figure is the median over its rounds of
the mean step time in the round, so load from other processes hits every model alike. Wall
time is the headline; the per-thread CPU time (``time.thread_time``, the main thread only,
so it is exact with one thread and a lower bound with two) is printed beside it as a
load-insensitive check. The run ends with a PASS/FAIL line per thread count for the
requirement "UltraMemV2 step <= 1.3x the dense step".

``--profile NAME`` instead runs ``torch.profiler`` over a few steps of one config and prints
the operators by self CPU time, and the time per ``record_function`` region when the model
has any: where the step's time goes.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
KINDS = ("dense", "moe", "pkm", "peer", "ultramem", "ultramemv2")
TARGET_RATIO = 1.3  # UltraMemV2 step / dense step, the experiments issue's budget


def config_path(kind: str) -> Path:
    return REPO / "configs" / f"shakespeare-{kind}.yaml"


class Stepper:
    """One config's model, AdamW and fixed batch: ``step()`` runs one training step."""

    def __init__(self, kind: str, batch: tuple[torch.Tensor, torch.Tensor]):
        from minimem.config import load_config
        from minimem.model import GPT
        from minimem.optim import build_optimizer, set_learning_rates
        from minimem.train import seed_everything

        config = load_config(config_path(kind))
        self.name, self.train = kind, config.train
        seed_everything(config.train.seed)
        self.model = GPT(config.model)
        self.model.train()
        self.optimizer = build_optimizer(self.model, config.train)
        set_learning_rates(self.optimizer, config.train.warmup_steps, config.train)
        self.params = list(self.model.parameters())
        self.x, self.y = batch
        self.n_targets = (self.y != -1).sum()
        self.max_norm = config.train.grad_clip or math.inf

    def step(self) -> None:
        from minimem.train import training_step

        training_step(self.model, self.model, self.optimizer, self.params, self.x, self.y, self.n_targets, 1, self.max_norm)


def fixed_batch(batch_size: int = 12, block_size: int = 64, seed: int = 1337):
    """One training batch of the shakespeare data, shared by every config (same shapes, same tokens)."""
    from minimem.data import get_dataset

    dataset = get_dataset("shakespeare", block_size, seed)
    return dataset.get_batch("train", batch_size, torch.Generator().manual_seed(seed))


def time_round_robin(steppers: list[Stepper], steps: int, repeats: int, warmup: int, desc: str) -> dict:
    """{name: (median wall ms/step, median thread-CPU ms/step)} over ``repeats`` interleaved rounds."""
    from tqdm.auto import tqdm

    for s in steppers:  # warm-up: allocator, lazy inits, optimiser state
        for _ in range(warmup):
            s.step()
    wall = {s.name: [] for s in steppers}
    cpu = {s.name: [] for s in steppers}
    with tqdm(total=repeats * len(steppers), desc=desc, unit="run", leave=False) as bar:
        for r in range(repeats):
            order = steppers if r % 2 == 0 else steppers[::-1]  # alternate, so no model always follows another
            for s in order:
                w0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(steps):
                    s.step()
                wall[s.name].append((time.perf_counter() - w0) / steps * 1e3)
                cpu[s.name].append((time.thread_time() - c0) / steps * 1e3)
                bar.update()
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in wall}


def print_table(results: dict, threads: int, counts: dict) -> bool:
    """Print ms/step and ratios to dense; return whether UltraMemV2 meets the target (wall time)."""
    base_wall, base_cpu = results["dense"]
    load = os.getloadavg()[0]
    print(f"\n{threads} thread(s), load average {load:.2f} on {os.cpu_count()} CPUs, median over interleaved rounds")
    header = f"{'config':<12} {'activated':>10} {'total':>10} {'wall ms/step':>13} {'x dense':>8} {'cpu ms/step':>12} {'x dense':>8}"
    print(header)
    print("-" * len(header))
    for name, (w, c) in results.items():
        act, tot = counts[name]
        print(f"{name:<12} {act:>10,} {tot:>10,} {w:>13.1f} {w / base_wall:>8.2f} {c:>12.1f} {c / base_cpu:>8.2f}")
    if "ultramemv2" not in results:
        return True
    ratio = results["ultramemv2"][0] / base_wall
    ok = ratio <= TARGET_RATIO
    cpu_ratio = results["ultramemv2"][1] / base_cpu
    print(
        f"{'PASS' if ok else 'FAIL'}: UltraMemV2 step = {ratio:.2f}x dense (wall; cpu {cpu_ratio:.2f}x), "
        f"target <= {TARGET_RATIO}x, {threads} thread(s)"
    )
    return ok


def profile(kind: str, steps: int, rows: int) -> None:
    """torch.profiler over ``steps`` training steps of ``kind``: operators by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    stepper = Stepper(kind, fixed_batch())
    for _ in range(3):
        stepper.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            stepper.step()
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    print(f"torch.profiler, {kind}, {steps} steps, {torch.get_num_threads()} thread(s): {total_us / steps / 1e3:.1f} ms/step of op time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minimem bench step", description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(KINDS), choices=KINDS, help="configs to time (dense always included)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts, one table each")
    parser.add_argument("--steps", type=int, default=5, help="steps per model per round")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (the median is taken over them)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds")
    parser.add_argument("--profile", choices=KINDS, help="profile one config instead of timing all")
    parser.add_argument("--rows", type=int, default=25, help="rows of the --profile table")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if any(t < 1 for t in args.threads):
        parser.error(f"--threads must all be >= 1, got {args.threads}")
    if args.profile:
        torch.set_num_threads(args.threads[0])
        profile(args.profile, args.steps, args.rows)
        return 0

    from minimem.accounting import count_parameters
    from minimem.config import load_config

    kinds = ["dense"] + [k for k in args.configs if k != "dense"]
    counts = {}
    for kind in kinds:
        c = count_parameters(load_config(config_path(kind)).model)
        counts[kind] = (c["activated"], c["total"])
    batch = fixed_batch()
    passed = True
    for threads in args.threads:
        torch.set_num_threads(threads)
        steppers = [Stepper(kind, batch) for kind in kinds]  # fresh models: every table starts alike
        results = time_round_robin(steppers, args.steps, args.repeats, args.warmup, f"bench step, {threads} thread(s)")
        passed = print_table(results, threads, counts) and passed
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
