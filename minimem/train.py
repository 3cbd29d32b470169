"""The trainer: a GPT (dense, MoE or with memory layers) from a config (``minimem train`` on the command line).

    minimem train --config configs/shakespeare-dense.yaml [--max-steps N] [--out DIR]
                  [--resume | --overwrite] [--set train.lr=2e-3 ...]

One optimiser step: sample a batch, forward, cross-entropy over the targets that are not
-1, plus the auxiliary losses the modules stored (the MoE balance loss), backward, clip the
gradient norm, AdamW (:mod:`minimem.optim`), then ``model.after_optimizer_step()``.
Every ``log_interval`` steps a line goes to ``OUT/metrics.jsonl`` (``train_loss`` is the mean
cross-entropy since the previous line; ``val_loss`` appears on eval steps); every
``ckpt_interval`` steps and at the end a checkpoint is written (:mod:`minimem.checkpoint`).
A non-finite loss stops the run, naming the step and keeping the last good checkpoint.

The run folder is never lost: a folder that holds a run is continued (``--resume``) or replaced
(``--overwrite``, which keeps the old run until the new one's first checkpoint is complete),
never silently; one process at a time writes it (a lock file); a full disk is reported and
leaves the last checkpoint loadable; and a model that cannot fit in memory is refused before
anything is allocated (:func:`estimate_memory`).

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

import contextlib
import errno
import fcntl
import json
import math
import os
import random
import shutil
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

from minimem.accounting import analytic_parameters, memory_dims, n_memory_layers
from minimem.checkpoint import (
    CONFIG_FILE,
    POINTER,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore,
    save_checkpoint,
    temporary,
)
from minimem.config import Config, ModelConfig
from minimem.data import get_dataset
from minimem.guards import available_memory, check_output_folder
from minimem.model import GPT
from minimem.optim import build_optimizer, set_learning_rates, value_lr_multiplier

METRICS_FILE = "metrics.jsonl"


class SetupError(ValueError):
    """The run cannot start: bad config, dataset, device or checkpoint (the CLI exits with 2)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class DiskFull(RuntimeError):
    """No space left on the run folder's device; the last complete checkpoint is kept."""


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
    """Drop the metric lines written after ``step`` (a crashed run logged past its last checkpoint).

    A line that does not parse was torn by a kill in the middle of a write: it and anything
    after it are dropped too.
    """
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break
        if record["step"] > step:
            break
        keep.append(line)
    tmp = temporary(path)
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the run folder
# One writer per run folder: ``OUT/.lock`` is held (flock) for the whole run and names the holder's
# PID. A folder that holds a run is only continued (--resume) or replaced (--overwrite). A
# replacement moves the old run's files into ``OUT/replaced-run/`` (via ``replaced-run.tmp/``, so
# that an interrupted move is recognised) and deletes them once the new run's first checkpoint
# is complete; if the new run ends before that, even by a kill, the old run is moved back.

LOCK_FILE = ".lock"
REPLACED = "replaced-run"


def _run_files(out: Path) -> list[Path]:
    """minimem's own files of the run in ``out`` (with the temporary ones a crash can leave)."""
    names = (METRICS_FILE, POINTER, CONFIG_FILE, "ckpt-")
    return sorted(p for p in out.iterdir() if p.name.startswith(names))


def _settle_replaced_run(out: Path) -> bool:
    """Finish a replacement (--overwrite) or undo it; True if the old run was moved back.

    With the new run's checkpoint in place, the old run is deleted. Without it, the new run's
    files are deleted and the old run is moved back, pointer last.
    """
    moving, replaced = out / f"{REPLACED}.tmp", out / REPLACED
    if replaced.is_dir():
        if (out / POINTER).exists():
            shutil.rmtree(replaced)
            return False
        for path in _run_files(out):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        os.replace(replaced, moving)  # from here on, ``out`` holds nothing of the new run
    if not moving.is_dir():
        return False
    for path in sorted(moving.iterdir(), key=lambda p: p.name == POINTER):  # pointer last
        os.replace(path, out / path.name)
    moving.rmdir()
    return True


def lock_run_folder(out: Path):
    """Take ``out``'s lock, or raise :class:`SetupError` naming the process that holds it.

    Returns the open lock file: the lock lasts until it is closed (or the process ends).
    """
    lock = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise SetupError(
            f"{out} is in use by another training process (PID {holder}): wait for it to end or choose another --out"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _open_run_folder(out: Path, resume: bool, overwrite: bool, log):
    """Check ``out``, create it, lock it and set an old run aside for --overwrite; returns the lock."""
    try:
        check_output_folder(out, "--out")
    except ValueError as err:
        raise SetupError(str(err)) from None
    if resume and not out.is_dir():
        raise SetupError(f"--resume: no checkpoint in {out} (no such folder)")
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_run_folder(out)
    try:
        if _settle_replaced_run(out):
            log(f"minimem train: {out}: moved back the run that an interrupted --overwrite had set aside")
        old = _run_files(out)
        if old and not (resume or overwrite):
            raise SetupError(
                f"--out {out} already holds a run: pass --resume to continue it or --overwrite to replace it"
            )
        if old and overwrite:
            moving = out / f"{REPLACED}.tmp"
            moving.mkdir()
            for path in sorted(old, key=lambda p: p.name != POINTER):  # pointer first: no reader follows it
                os.replace(path, moving / path.name)
            os.replace(moving, out / REPLACED)
            log(
                f"minimem train: --overwrite: the run in {out} is set aside and deleted once this run's "
                f"first checkpoint is complete"
            )
    except BaseException:
        lock.close()
        raise
    return lock


def _no_space(out: Path) -> str:
    return f"no space left on device for the run folder {out}: free some space or choose another --out"


def _kept(out: Path) -> str:
    """What a run that stops early leaves behind, for its message."""
    if (out / REPLACED).is_dir() and not (out / POINTER).exists():
        return f"the run it replaces is kept in {out}"
    good = latest_checkpoint(out) if out.is_dir() else None
    return f"the last good checkpoint is {good}" if good else "no checkpoint had been written"


def _agree(dist: Distributed, problem: Optional[str]) -> None:
    """Raise :class:`SetupError` on every rank if any rank found a problem (a rank that stopped
    alone would leave the others waiting for it forever)."""
    if dist.world_size > 1:
        problems = [None] * dist.world_size
        torch_dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise SetupError(problem)


@contextlib.contextmanager
def _run_folder(out: Path, dist: Distributed, resume: bool, overwrite: bool, log, problem: Optional[str] = None):
    """Own the run folder for the body: rank 0 opens and locks it; ``problem`` is this rank's setup
    error so far. Every rank raises :class:`SetupError` if any rank has a problem.

    If the body raises, an old run that --overwrite set aside is moved back (unless the new
    run's first checkpoint is complete), and a full disk is reported as such.
    """
    lock = None
    if dist.is_main and problem is None:
        try:
            lock = _open_run_folder(out, resume, overwrite, log)
        except SetupError as err:
            problem = str(err)
        except OSError as err:
            problem = _no_space(out) if err.errno == errno.ENOSPC else f"--out {out}: {err}"
    try:
        _agree(dist, problem)
        yield
    except BaseException as err:
        if lock is not None:  # only the folder's owner may touch it
            _settle_replaced_run(out)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskFull(f"{_no_space(out)}; {_kept(out)}") from err
        raise
    finally:
        if lock is not None:
            lock.close()


# ----------------------------------------------------------------------------- memory needed


def estimate_memory(config: Config, world_size: int = 1) -> dict:
    """A rough upper bound of one training process's memory, in bytes by part (float32 throughout).

    With P parameters (counted from the config, nothing built): the weights, their gradients and
    AdamW's two moments take 16 P bytes. The activations kept for the backward pass are counted
    per token of the process's batch share (``batch_size / world_size`` x ``block_size``):

    - per block: 10 h (norm inputs and outputs, q, k, v, attention output, residuals),
      2 n_head T (attention scores and probabilities, as if materialised over the context T)
      and the FFN: 3 ffn_hidden (SwiGLU's two projections and their product), for a MoE
      n_experts + 3 top_k d_expert (+ 3 d_expert for a shared expert);
    - per memory layer: H (D_k + 2 n + m^2 + m (D_v + D_p + 2)) + D_v (queries, sub-key scores,
      the m x m candidate grid, the m rows read with their scores and indices, the output);
    - the head: 3 V (the logits, their float32 copy and the softmax gradient).

    Not counted: the dataset, the evaluation batches, PyTorch itself (a few hundred MB).
    """
    m = config.model
    n_params = analytic_parameters(m)["total"]
    if m.ffn == "moe":
        ffn = m.moe.n_experts + 3 * m.moe.top_k * m.moe.d_expert + (3 * m.moe.d_expert if m.moe.shared_expert else 0)
    else:
        ffn = 3 * m.ffn_hidden
    per_token = m.n_layer * (10 * m.n_embd + 2 * m.n_head * m.block_size + ffn) + 3 * m.vocab_size
    if m.memory.kind != "none":
        d = memory_dims(m)
        per_layer = d["H"] * (d["d_key"] + 2 * d["n"] + d["m"] ** 2 + d["m"] * (d["d_value"] + d["d_pre"] + 2))
        per_token += n_memory_layers(m) * (per_layer + d["d_value"])
    tokens = config.train.batch_size // world_size * m.block_size
    return dict(parameters=n_params, states=16 * n_params, activations=4 * per_token * tokens)


def check_memory(config: Config, dist: Distributed) -> None:
    """Refuse a run whose :func:`estimate_memory` exceeds the memory available, before allocating."""
    need = estimate_memory(config, dist.world_size)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.device.type == "cpu" else 1  # processes sharing RAM
    total = (need["states"] + need["activations"]) * local
    available, source = available_memory(dist.device)
    if available is None or total <= available:
        return
    gb = lambda n: f"{n / 1e9:,.1f} GB"
    raise SetupError(
        f"this run needs about {gb(total)} of memory ({gb(need['states'])} for {need['parameters']:,} parameters, "
        f"their gradients and AdamW moments, {gb(need['activations'])} of activations at "
        f"train.batch_size={config.train.batch_size}"
        + (f", times {local} processes" if local > 1 else "")
        + f") but {gb(available)} is available ({source}): lower model.n_layer, model.n_embd, "
        f"model.ffn_hidden, the memory's n_slots or train.batch_size"
    )


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


def training_step(
    model, raw_model: GPT, optimizer, params, x, y, n_targets, world_size: int = 1, max_norm: float = math.inf
) -> torch.Tensor:
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
    overwrite: bool = False,
) -> TrainResult:
    """Train the model ``config`` describes; see the module docstring.

    ``resume`` continues from ``train.out_dir``'s latest checkpoint; ``overwrite`` replaces a run
    that is already there, keeping the old one until the new run's first checkpoint is complete
    (without either, a folder holding a run is refused with :class:`SetupError`). ``stop_at`` ends
    the run after that step with a checkpoint, as a clean interruption: the learning-rate
    schedule still spans ``train.max_steps``, so a later ``resume`` continues the same run.

    Raises :class:`SetupError` before training for a bad config, ``--out``, dataset, device or
    checkpoint, a run folder in use by another process, or a model that would not fit in memory;
    :class:`TrainingDiverged` or :class:`DiskFull` when the run stops early.
    """
    tc = config.train
    try:
        config.validate()
        if tc.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0 disables clipping), got {tc.grad_clip}")
        if stop_at is not None and not 1 <= stop_at <= tc.max_steps:
            raise ValueError(f"stop_at must be in [1, train.max_steps={tc.max_steps}], got {stop_at}")
        if resume and overwrite:
            raise ValueError("--resume continues the run in the folder and --overwrite replaces it: pass only one")
        dist = setup_distributed(tc.device)
    except ValueError as err:
        raise SetupError(str(err)) from err
    threads = torch.get_num_threads()
    try:
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        return _train(config, dist, resume, stop_at or tc.max_steps, progress, overwrite)
    finally:
        torch.set_num_threads(threads)
        if dist.owns_group:
            torch_dist.destroy_process_group()


def _train(
    config: Config, dist: Distributed, resume: bool, last_step: int, progress: bool, overwrite: bool = False
) -> TrainResult:
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
    except ValueError as err:
        raise SetupError(str(err)) from err
    try:
        check_memory(config, dist)
        problem = None
    except SetupError as err:  # each rank checks its own memory; _run_folder tells every rank
        problem = str(err)
    log = print if dist.is_main else (lambda *a, **k: None)
    with _run_folder(out, dist, resume, overwrite, log, problem):
        try:
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
            if checkpoint is not None:
                restore(checkpoint, model, optimizer, data_generator)
                if checkpoint.step > last_step:
                    raise SetupError(
                        f"--resume: the checkpoint is at step {checkpoint.step}, past the last step {last_step}"
                    )
        except SetupError:
            raise
        except ValueError as err:  # includes CheckpointError
            raise SetupError(str(err)) from err
        return _train_loop(
            config, dist, dataset, adopted, model, optimizer, data_generator, checkpoint, last_step, progress, log
        )


def _train_loop(
    config: Config,
    dist: Distributed,
    dataset,
    adopted: bool,
    model: GPT,
    optimizer,
    data_generator,
    checkpoint,
    last_step: int,
    progress: bool,
    log,
) -> TrainResult:
    """The steps from the checkpoint's (or 0) to ``last_step``, in a run folder :func:`_run_folder` owns."""
    from tqdm.auto import tqdm

    tc = config.train
    out = Path(tc.out_dir)
    step = checkpoint.step if checkpoint is not None else 0
    metrics_path = out / METRICS_FILE
    if dist.is_main:
        if checkpoint is not None:
            _truncate_metrics(metrics_path, step)
            changed = _diff(checkpoint.config.to_dict()["train"], config.to_dict()["train"])
            if changed:
                log("minimem train: resuming with a changed train config: " + "; ".join(changed))
        config.save_json(out / CONFIG_FILE)
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
            _settle_replaced_run(out)  # with --overwrite, the first checkpoint is complete: the old run goes

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
            bad = [
                f"{what} is {v}"
                for what, v in (("loss", ce_i + aux_i), ("gradient norm", norm_i))
                if not math.isfinite(v)
            ]
            if bad:  # the update of that step is poisoned: stop before any checkpoint takes it in
                bar.close()
                raise TrainingDiverged(f"{' and '.join(bad)} at step {first + i}; training stopped; {_kept(out)}")
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
