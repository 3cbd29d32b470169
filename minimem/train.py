"""``minimem train``: train a GPT (dense, MoE or with memory layers) from a YAML config.

    minimem train --config configs/shakespeare-dense.yaml [--max-steps N] [--out DIR]
                  [--resume] [--set train.lr=2e-3 ...]

One optimiser step: sample a batch, forward, cross-entropy over the targets that are not
-1, plus the auxiliary losses the modules stored (the MoE balance loss), backward, clip the
gradient norm, AdamW (:mod:`minimem.optim`), then ``model.after_optimizer_step()``.
Every ``log_interval`` steps a line goes to ``OUT/metrics.jsonl`` (``train_loss`` is the mean
cross-entropy since the previous line; ``val_loss`` appears on eval steps); every
``ckpt_interval`` steps and at the end a checkpoint is written (:mod:`minimem.checkpoint`).
A non-finite loss stops the run, naming the step and keeping the last good checkpoint.

Exact resume: the checkpoint holds weights, AdamW moments, the step and every random
state (the batch sampler has its own ``torch.Generator``), so ``--resume`` replays the
remaining steps bit for bit: same batches, same updates, same losses.

Data parallel: under ``torchrun --nproc_per_node=R`` each rank draws the same global batch
of ``train.batch_size`` sequences from the same generator and keeps its ``batch_size / R``
rows; each rank's loss is its summed cross-entropy over the *global* number of targets, so
the averaged gradients equal one process's on the whole batch (up to float rounding, also
with answer-only masks). The MoE balance loss is computed per shard (a statistic of the
shard's routing), so MoE runs match one process only approximately. Only rank 0 writes
files and shows the progress bar.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# On a shared CPU machine OpenMP's default busy-waiting makes torch's threads spin against other
# processes: 2 threads ran 8x slower than 1 under load here. Passive waiting costs little when the
# machine is quiet. It only takes effect if torch is not imported yet (the `minimem` command).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from minimem.checkpoint import (
    POINTER, capture_rng, latest_checkpoint, load_checkpoint, restore, save_checkpoint,
)
from minimem.config import Config, ModelConfig, load_config
from minimem.model import GPT
from minimem.optim import build_optimizer, set_learning_rates, value_lr_multiplier

METRICS_FILE = "metrics.jsonl"


class SetupError(ValueError):
    """The run cannot start: bad config, dataset, device or checkpoint (the CLI exits with 2)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    train_loss: float  # mean train cross-entropy over the last logging interval
    val_loss: Optional[float]  # validation cross-entropy at the last step
    steps: int  # optimiser steps done (including those before a resume)
    wall_time_s: float  # this call's wall time
    tokens_per_s: float  # training tokens per second over this call
    out_dir: Path
    n_params: int
    model: GPT  # the trained model (unwrapped from DDP)


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we called init_process_group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Distributed:
    """Read torchrun's environment; join the process group (gloo on CPU, NCCL on CUDA)."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SetupError(f"train.device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"train.device={device!r} but CUDA is not available (use train.device=cpu)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    owns = not torch_dist.is_initialized()
    if owns:
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank, world_size, dev, owns)


def _adopt_vocab_size(config: Config, vocab_size: int, dataset: str) -> bool:
    """Take the vocabulary size from the dataset unless the config names a different one.

    The dataclass default (65) counts as "not set"; any other value must match. True if changed.
    """
    default = ModelConfig.vocab_size
    have = config.model.vocab_size
    if have == vocab_size:
        return False
    if have != default:
        raise SetupError(
            f"model.vocab_size={have} but dataset {dataset!r} has {vocab_size} tokens: "
            f"remove model.vocab_size from the config or set it to {vocab_size}"
        )
    config.model.vocab_size = vocab_size
    return True


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the metric lines written after ``step`` (a crashed run logged past its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _clear_run(out: Path) -> None:
    """A fresh run in ``out`` replaces the files of an earlier run there (only minimem's own)."""
    for name in (METRICS_FILE, POINTER, "config.json"):
        (out / name).unlink(missing_ok=True)
    for old in out.glob("ckpt-*"):
        shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def evaluate_loss(model: GPT, dataset, batch_size: int, iters: int, seed: int, dist: Distributed) -> float:
    """Mean validation cross-entropy over ``iters`` fixed batches (the same at every evaluation)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)  # summed loss, counted targets
    per_rank = batch_size // dist.world_size
    rows = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    for _ in range(iters):
        x, y = dataset.get_batch("val", batch_size, generator)
        x, y = x[rows].to(dist.device), y[rows].to(dist.device)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum")
        total += torch.stack([loss.double(), (y != -1).sum().double()])
    if dist.world_size > 1:
        torch_dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------- training


def training_step(model, raw_model: GPT, optimizer, params, x, y, n_targets, world_size: int = 1,
                  max_norm: float = math.inf) -> torch.Tensor:
    """One optimiser step on this rank's rows ``x, y``; returns (cross-entropy share, aux loss, grad norm).

    ``n_targets`` counts the targets of the *global* batch, so each rank's summed cross-entropy
    divided by it is that rank's share of the global mean; DDP averages gradients over ranks,
    hence the factor ``world_size``. ``model`` may be the DDP wrapper of ``raw_model``.
    """
    logits, _ = model(x)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum")
    ce = ce / n_targets.to(ce.device)
    aux = raw_model.aux_loss()
    optimizer.zero_grad(set_to_none=True)
    (ce * world_size + aux).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    raw_model.after_optimizer_step()
    return torch.stack([ce.detach(), aux.detach().float(), grad_norm.detach().float()])


def train(
    config: Config,
    resume: bool = False,
    stop_at: Optional[int] = None,
    progress: bool = True,
) -> TrainResult:
    """Train the model ``config`` describes; see the module docstring.

    ``resume`` continues from ``train.out_dir``'s latest checkpoint. ``stop_at`` ends the run
    after that step with a checkpoint, as a clean interruption: the learning-rate schedule
    still spans ``train.max_steps``, so a later ``resume`` continues the same run.
    """
    tc = config.train
    try:
        config.validate()
        if tc.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0 disables clipping), got {tc.grad_clip}")
        if stop_at is not None and not 1 <= stop_at <= tc.max_steps:
            raise ValueError(f"stop_at must be in [1, train.max_steps={tc.max_steps}], got {stop_at}")
        dist = setup_distributed(tc.device)
    except ValueError as err:
        raise SetupError(str(err)) from err
    threads = torch.get_num_threads()
    try:
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        return _train(config, dist, resume, stop_at or tc.max_steps, progress)
    finally:
        torch.set_num_threads(threads)
        if dist.owns_group:
            torch_dist.destroy_process_group()


def _train(config: Config, dist: Distributed, resume: bool, last_step: int, progress: bool) -> TrainResult:
    from tqdm.auto import tqdm

    from minimem.data import get_dataset

    tc = config.train
    out = Path(tc.out_dir)
    # ---------------------------------------------------------------- setup
    try:
        if tc.batch_size % dist.world_size != 0:
            raise ValueError(
                f"train.batch_size={tc.batch_size} (the global batch) must be divisible by the "
                f"number of processes ({dist.world_size})"
            )
        dataset = get_dataset(tc.dataset, config.model.block_size, tc.seed, **tc.dataset_args)
        adopted = _adopt_vocab_size(config, dataset.vocab_size, tc.dataset)
        checkpoint = None
        if resume:
            if latest_checkpoint(out) is None:
                raise SetupError(f"--resume: no checkpoint in {out} ({out / POINTER} is missing)")
            checkpoint = load_checkpoint(out)
            changed = _diff(checkpoint.config.to_dict()["model"], config.to_dict()["model"])
            if changed:
                raise SetupError(
                    f"--resume: the model config differs from the checkpoint's in {out}: " + "; ".join(changed)
                )
        seed_everything(tc.seed)
        model = GPT(config.model).to(dist.device)
        optimizer = build_optimizer(model, tc)
        data_generator = torch.Generator().manual_seed(tc.seed)
        step = 0
        if checkpoint is not None:
            restore(checkpoint, model, optimizer, data_generator)
            step = checkpoint.step
            if step > last_step:
                raise SetupError(f"--resume: the checkpoint is at step {step}, past the last step {last_step}")
    except SetupError:
        raise
    except ValueError as err:  # includes CheckpointError
        raise SetupError(str(err)) from err

    log = print if dist.is_main else (lambda *a, **k: None)
    metrics_path = out / METRICS_FILE
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            if (out / POINTER).exists():
                log(f"minimem train: starting afresh in {out}: its earlier run is replaced (--resume continues it)")
            _clear_run(out)
        else:
            _truncate_metrics(metrics_path, step)
            changed = _diff(checkpoint.config.to_dict()["train"], config.to_dict()["train"])
            if changed:
                log("minimem train: resuming with a changed train config: " + "; ".join(changed))
        config.save_json(out / "config.json")
    if adopted:
        log(f"minimem train: model.vocab_size set to {dataset.vocab_size} from dataset {tc.dataset!r}")
    n_params = model.num_parameters()
    log(
        f"minimem train: {n_params:,} parameters, {tc.dataset} (vocab {dataset.vocab_size}), "
        f"{'resuming at step ' + str(step) if checkpoint else 'fresh run'}, out {out}"
        + (f", {dist.world_size} processes" if dist.world_size > 1 else "")
    )

    raw_model = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    per_rank = tc.batch_size // dist.world_size
    rows = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    tokens_per_step = tc.batch_size * config.model.block_size
    has_values = any(g["name"] == "memory_values" for g in optimizer.param_groups)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf

    def save(at_step: int) -> None:
        if dist.is_main:
            save_checkpoint(out, at_step, raw_model, optimizer, config, capture_rng(data_generator))

    # ---------------------------------------------------------------- loop
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (progress and dist.is_main), desc="train", unit="step")
    pending: list[torch.Tensor] = []  # per step: (cross-entropy share, aux loss, grad norm), read at log time
    start_step, t_start = step, time.perf_counter()
    t_last, step_last = t_start, step
    train_loss, val_loss = math.nan, None
    model.train()
    while step < last_step:
        lr = set_learning_rates(optimizer, step, tc)
        x, y = dataset.get_batch("train", tc.batch_size, data_generator)
        n_targets = (y != -1).sum().clamp(min=1)  # over the global batch
        x, y = x[rows].to(dist.device, non_blocking=True), y[rows].to(dist.device, non_blocking=True)
        pending.append(training_step(model, raw_model, optimizer, params, x, y, n_targets, dist.world_size, max_norm))
        step += 1
        bar.update(1)

        do_eval = step % tc.eval_interval == 0 or step == last_step
        do_ckpt = step % tc.ckpt_interval == 0 or step == last_step
        if not (do_eval or do_ckpt or step % tc.log_interval == 0):
            continue
        # ------------------------------------------------------------ log (one sync)
        values = torch.stack(pending)
        if dist.world_size > 1:
            torch_dist.all_reduce(values)  # ce shares add up; aux and norm are averaged below
            values[:, 1:] /= dist.world_size
        values = values.tolist()
        first = step - len(values) + 1
        for i, (ce_i, aux_i, norm_i) in enumerate(values):
            bad = [f"{what} is {v}" for what, v in (("loss", ce_i + aux_i), ("gradient norm", norm_i)) if not math.isfinite(v)]
            if bad:  # the update of that step is poisoned: stop before any checkpoint takes it in
                bar.close()
                good = latest_checkpoint(out) if out.exists() else None
                kept = f"the last good checkpoint is {good}" if good else "no checkpoint had been written"
                raise TrainingDiverged(f"{' and '.join(bad)} at step {first + i}; training stopped; {kept}")
        now = time.perf_counter()
        train_loss = sum(v[0] for v in values) / len(values)
        record = {
            "step": step,
            "train_loss": train_loss,
            "aux_loss": sum(v[1] for v in values) / len(values),
            "grad_norm": values[-1][2],
            "lr": lr,
            "tokens_per_s": tokens_per_step * (step - step_last) / max(now - t_last, 1e-9),
            "elapsed_s": now - t_start,
        }
        if has_values:
            record["value_lr"] = lr * value_lr_multiplier(step - 1, tc)
        pending.clear()
        if do_eval:
            val_loss = evaluate_loss(raw_model, dataset, tc.batch_size, tc.eval_iters, tc.seed + 1, dist)
            record["val_loss"] = val_loss
            if getattr(dataset, "has_exact_match", False) and dist.is_main:
                record["exact_match"] = dataset.evaluate(raw_model)["exact_match"]
        if dist.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(
                loss=f"{train_loss:.3f}", **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}), lr=f"{lr:.2e}"
            )
        if do_ckpt:
            save(step)
        t_last, step_last = time.perf_counter(), step
    bar.close()
    if step == start_step and metrics_path.exists():  # resumed a finished run: report its last numbers
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            train_loss, val_loss = record["train_loss"], record.get("val_loss", val_loss)
    wall = time.perf_counter() - t_start
    tokens_per_s = tokens_per_step * (step - start_step) / max(wall, 1e-9)
    log(
        f"minimem train: step {step}: train loss {train_loss:.4f}, val loss "
        f"{'n/a' if val_loss is None else f'{val_loss:.4f}'}, {wall:.1f} s, {tokens_per_s:,.0f} tokens/s"
    )
    return TrainResult(train_loss, val_loss, step, wall, tokens_per_s, out, n_params, raw_model)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimem train", description="Train a model from a YAML config.")
    parser.add_argument("--config", help="YAML config file (optional with --resume: the run's saved config)")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--out", help="run folder (override train.out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                        help="override config fields, e.g. --set train.lr=2e-3 model.n_layer=6")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The run's config: the YAML file (or, with --resume and no --config, the run's config.json) plus overrides."""
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.out is not None:
        overrides.append(f"train.out_dir={json.dumps(args.out)}")
    if args.config is not None:
        return load_config(args.config, overrides)
    if not args.resume:
        raise ValueError("--config is required (it may be left out only with --resume)")
    out = Path(args.out) if args.out else Path(Config().train.out_dir)
    path = latest_checkpoint(out)
    if path is None:
        raise ValueError(f"--resume without --config: no checkpoint in {out}")
    return load_config(path / "config.json", overrides)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        train(config, resume=args.resume, progress=not args.no_progress)
    except SetupError as err:  # bad config, dataset, device or checkpoint: no traceback
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
