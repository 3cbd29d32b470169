"""``minimem bench train``: training and inference tokens/s of the dense and MoE configs on CPU.

    minimem bench train [--steps 30] [--threads N] [--configs A.yaml B.yaml]
    minimem bench train --reference [--out DIR]

The table times the trainer's own step (:func:`minimem.train.training_step`: forward,
backward, clipping, AdamW) on real batches, and a no-grad forward of the same batch for
inference. ``--reference`` runs ``configs/shakespeare-dense.yaml`` end to end and prints the
final validation loss and wall time against the targets (val loss <= 1.89 within 75 s on the
2-core CPU machine), with the machine's load average, because timings on a shared machine
are only as good as its quietness.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

# On a shared CPU machine OpenMP's default busy-waiting makes torch's threads spin against other
# processes: 2 threads ran 8x slower than 1 under load here. Passive waiting costs little when the
# machine is quiet. It only takes effect if torch is not imported yet (the `minimem` command).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from minimem_tools import course

CONFIGS = [course.path("configs/shakespeare-dense.yaml"), course.path("configs/shakespeare-moe.yaml")]
REFERENCE_VAL_LOSS, REFERENCE_SECONDS = 1.89, 75.0


def throughput(config_path: Path, steps: int, warmup: int = 5) -> dict:
    """Median-free, simple timing: ``warmup`` untimed steps, then ``steps`` timed ones."""
    from minimem.accounting import count_parameters
    from minimem.config import load_config
    from minimem.data import get_dataset
    from minimem.model import GPT
    from minimem.optim import build_optimizer, set_learning_rates
    from minimem.train import seed_everything, training_step

    config = load_config(config_path)
    tc = config.train
    dataset = get_dataset(tc.dataset, config.model.block_size, tc.seed, **tc.dataset_args)
    config.model.vocab_size = dataset.vocab_size
    seed_everything(tc.seed)
    model = GPT(config.model)
    optimizer = build_optimizer(model, tc)
    set_learning_rates(optimizer, tc.warmup_steps, tc)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(tc.seed)
    batches = [dataset.get_batch("train", tc.batch_size, generator) for _ in range(warmup + steps)]
    tokens = tc.batch_size * config.model.block_size

    model.train()
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        training_step(model, model, optimizer, params, x, y, (y != -1).sum(), 1, tc.grad_clip or math.inf)
    train_s = (time.perf_counter() - start) / steps

    model.eval()
    with torch.no_grad():
        for i, (x, _) in enumerate(batches):
            if i == warmup:
                start = time.perf_counter()
            model(x)
    infer_s = (time.perf_counter() - start) / steps
    counts = count_parameters(config.model)
    return dict(
        name=config_path.stem,
        total=counts["total"],
        activated=counts["activated"],
        train_ms=train_s * 1e3,
        train_tok_s=tokens / train_s,
        infer_ms=infer_s * 1e3,
        infer_tok_s=tokens / infer_s,
    )


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'config':<22} {'total':>10} {'activated':>10} {'train ms/step':>14} {'train tok/s':>12} "
        f"{'infer ms':>9} {'infer tok/s':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:<22} {r['total']:>10,} {r['activated']:>10,} {r['train_ms']:>14.1f} "
            f"{r['train_tok_s']:>12,.0f} {r['infer_ms']:>9.2f} {r['infer_tok_s']:>12,.0f}"
        )
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            print(
                f"{r['name']} / {base['name']}: training {r['train_tok_s'] / base['train_tok_s']:.2f}x, "
                f"inference {r['infer_tok_s'] / base['infer_tok_s']:.2f}x the tokens/s"
            )


def reference(out: str | None) -> int:
    from minimem.config import load_config
    from minimem.train import train

    config = load_config(CONFIGS[0])
    config.train.out_dir = out or tempfile.mkdtemp(prefix="minimem-reference-")
    load_before = os.getloadavg()[0]
    result = train(config, overwrite=True)  # the reference run's folder: a rerun replaces it
    load_after = os.getloadavg()[0]
    ok_loss, ok_time = result.val_loss <= REFERENCE_VAL_LOSS, result.wall_time_s <= REFERENCE_SECONDS
    print(f"reference run ({CONFIGS[0].name}, {result.steps} steps, {torch.get_num_threads()} threads)")
    print(f"  final val loss {result.val_loss:.4f}  (target <= {REFERENCE_VAL_LOSS}: {'ok' if ok_loss else 'MISSED'})")
    print(
        f"  wall time      {result.wall_time_s:.1f} s  "
        f"(target <= {REFERENCE_SECONDS:.0f} s: {'ok' if ok_time else 'MISSED'})"
    )
    print(f"  load average   {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} CPUs")
    print(f"  run folder     {result.out_dir}")
    return 0 if ok_loss and ok_time else 1


def main(argv: list[str] | None = None) -> int:
    from minimem.config import MAX_THREADS, load_config
    from minimem.guards import check_output_folder
    from minimem.train import SetupError
    from minimem_tools.cli import ArgumentParser

    parser = ArgumentParser(prog="minimem bench train", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per config")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--configs", nargs="+", type=Path, default=CONFIGS, help="YAML configs to time")
    parser.add_argument("--reference", action="store_true", help="run the reference training and check its targets")
    parser.add_argument("--out", help="run folder for --reference (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.threads <= MAX_THREADS:
        parser.error(f"--threads must be in [0, {MAX_THREADS}] (0: torch's default), got {args.threads}")
    if args.reference and args.configs is not CONFIGS:
        parser.error(f"--reference always runs {CONFIGS[0].name}; leave out --configs")
    if args.out is not None and not args.reference:
        parser.error("--out is the run folder of --reference; add --reference or leave out --out")
    try:  # every named config loads and validates before any timing starts
        for path in args.configs:
            load_config(path)
        if args.out is not None:
            check_output_folder(args.out, "--out")
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.reference:
        try:
            return reference(args.out)
        except SetupError as err:  # e.g. --out already holds another run
            parser.error(str(err))
    from tqdm.auto import tqdm

    rows = [throughput(path, args.steps) for path in tqdm(args.configs, desc="bench train", unit="config")]
    print(f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
