"""Checkpoints that survive a crash, and resume bit for bit.

A checkpoint is a folder ``OUT/ckpt-0000500/`` holding

- ``model.safetensors``: the weights (tied tensors stored once);
- ``optimizer.pt``: the AdamW state (moments, step counts, groups);
- ``config.json``: the full run config;
- ``state.json``: the step, every random state (torch, numpy, python, the data sampler's
  generator, CUDA) and the SHA-256 of every file a resume reads: the weights, the optimiser
  state, the config and ``state.json``'s own step, random states and extra (hashed as
  canonical JSON, without the hashes themselves).

``OUT/checkpoint.json`` names the latest complete checkpoint. A save writes the new folder
under a temporary name unique to the process, flushes it to disk, renames it, and only then
replaces ``checkpoint.json`` (write a temporary file, rename over the old one: atomic on
POSIX). A crash at any moment leaves ``checkpoint.json`` pointing at a complete checkpoint;
older folders are deleted only after the pointer moved. A save that fails with an
``OSError`` (a full disk) removes its partial folder and leaves the last checkpoint as it was.
Loading verifies the hashes, so a damaged or hand-edited file is reported by name instead of
resuming from garbage or from the wrong step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from minimem.config import Config, config_from_dict
from minimem.model import GPT

POINTER = "checkpoint.json"
MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "config.json", "state.json"
FORMAT_VERSION = 2  # 2: config.json and state.json are hashed too; version 1 checkpoints still load


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read: apply it with :func:`restore`."""

    path: Path  # the ckpt-* folder
    step: int
    config: Config
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    rng: dict
    extra: dict


# ----------------------------------------------------------------------------- random states


def capture_rng(data_generator: Optional[torch.Generator] = None) -> dict:
    """Every random state a training step may consume, as JSON-serialisable values."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _encode(torch.get_rng_state()),
    }
    if data_generator is not None:
        state["data"] = _encode(data_generator.get_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict, data_generator: Optional[torch.Generator] = None) -> None:
    """Inverse of :func:`capture_rng`."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(_decode(state["torch"]))
    if data_generator is not None:
        if "data" not in state:
            raise CheckpointError("checkpoint has no data sampler state ('data' missing from rng)")
        data_generator.set_state(_decode(state["data"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode(s) for s in state["cuda"]])


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _decode(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


# ----------------------------------------------------------------------------- saving


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    config: Config,
    rng: Optional[dict] = None,
    extra: Optional[dict] = None,
) -> Path:
    """Write ``OUT/ckpt-<step>/`` atomically and point ``OUT/checkpoint.json`` at it; return the folder."""
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:07d}"
    final, tmp = out_dir / name, temporary(out_dir / name)
    shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash
    tmp.mkdir()
    try:
        save_model(model, str(tmp / MODEL_FILE))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
        state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "rng": rng if rng is not None else capture_rng(),
            "extra": extra or {},
        }
        state["sha256"] = {f: _sha256(tmp / f) for f in (MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE) if (tmp / f).exists()}
        state["sha256"][STATE_FILE] = _state_sha256(state)
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
    except OSError:  # a full disk, say: free what was written; the last checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # left by a crash between this rename and the pointer update
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(out_dir)
    _write_atomic(out_dir / POINTER, json.dumps({"step": step, "path": name}) + "\n")
    for old in out_dir.glob("ckpt-*"):  # the pointer has moved: older checkpoints can go
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def temporary(path: Path) -> Path:
    """Where to write ``path`` before renaming it into place: unique to this process."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = temporary(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_sha256(state: dict) -> str:
    """SHA-256 of ``state.json``'s content without its hashes (canonical JSON: sorted keys)."""
    content = {k: v for k, v in state.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- loading


def latest_checkpoint(out_dir: str | Path) -> Optional[Path]:
    """The folder ``OUT/checkpoint.json`` points at, or None if there is no pointer."""
    out_dir = Path(out_dir)
    pointer = out_dir / POINTER
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["path"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"corrupt checkpoint pointer {pointer}: {err}") from None
    path = out_dir / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which does not exist in {out_dir}")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder, or the latest one of a run folder, verifying every file.

    Raises :class:`CheckpointError` naming the file that is missing or damaged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if (path / POINTER).exists() or not (path / STATE_FILE).exists():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path} (no {POINTER} and no {STATE_FILE})")
        path = found
    for f in (STATE_FILE, CONFIG_FILE, MODEL_FILE):
        if not (path / f).is_file():
            raise CheckpointError(f"incomplete checkpoint {path}: {f} is missing")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        step, rng = int(state["step"]), state["rng"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"corrupt checkpoint file {path / STATE_FILE}: {err!r}") from None
    version = state.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(
            f"{path / STATE_FILE} has format_version {version!r}; this minimem reads 1 and {FORMAT_VERSION}"
        )
    hashes = state.get("sha256", {})
    # Version 1 hashed only the binary files; from version 2 on, every file a resume reads must be hashed.
    if version >= 2:
        needed = [STATE_FILE, CONFIG_FILE, MODEL_FILE] + [OPTIMIZER_FILE] * (path / OPTIMIZER_FILE).exists()
        unhashed = [f for f in needed if f not in hashes]
        if unhashed:
            raise CheckpointError(
                f"corrupt checkpoint file {path / STATE_FILE}: it records no SHA-256 of {unhashed[0]}"
            )
    for f, digest in hashes.items():
        if f == STATE_FILE:
            if _state_sha256(state) != digest:
                raise CheckpointError(
                    f"corrupt checkpoint file {path / STATE_FILE}: its step, random states or extra do not match "
                    f"its SHA-256 (edited or damaged)"
                )
            continue
        if not (path / f).is_file():
            raise CheckpointError(f"incomplete checkpoint {path}: {f} is missing")
        if _sha256(path / f) != digest:
            raise CheckpointError(f"corrupt checkpoint file {path / f}: SHA-256 does not match {STATE_FILE}")
    try:
        config = config_from_dict(json.loads((path / CONFIG_FILE).read_text()), saved=True)
    except ValueError as err:
        raise CheckpointError(f"corrupt checkpoint file {path / CONFIG_FILE}: {err}") from None
    try:
        model_state = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt checkpoint file {path / MODEL_FILE}: {err}") from None
    optimizer_state: dict = {}
    if (path / OPTIMIZER_FILE).exists():
        try:
            optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a damaged pickle/zip
            raise CheckpointError(f"corrupt checkpoint file {path / OPTIMIZER_FILE}: {err}") from None
    return Checkpoint(path, step, config, model_state, optimizer_state, rng, state.get("extra", {}))


def restore(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    data_generator: Optional[torch.Generator] = None,
    rng: bool = True,
) -> None:
    """Load weights (strict), optimiser state and random states from ``checkpoint``."""
    device = next(model.parameters()).device
    # save_model stores a tied tensor (lm_head = tok_emb) once, under one of its names.
    tied: dict[tuple, list[str]] = {}
    for name, t in model.state_dict().items():
        tied.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(name)
    alias = {n: names for names in tied.values() for n in names}
    try:
        missing, unexpected = model.load_state_dict(
            {k: v.to(device) for k, v in checkpoint.model_state.items()}, strict=False
        )
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"checkpoint {checkpoint.path} does not fit the model: {err}") from None
    missing = [n for n in missing if not any(a in checkpoint.model_state for a in alias[n])]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not fit the model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    if optimizer is not None:
        if not checkpoint.optimizer_state:
            raise CheckpointError(f"checkpoint {checkpoint.path} has no optimizer state ({OPTIMIZER_FILE})")
        try:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {checkpoint.path}: optimizer state does not fit: {err}") from None
    if rng:
        restore_rng(checkpoint.rng, data_generator)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the GPT of a run (or checkpoint) folder with its trained weights, in eval mode."""
    checkpoint = load_checkpoint(path)
    model = GPT(checkpoint.config.model).to(device)
    restore(checkpoint, model, rng=False)
    return model.eval()


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "restore",
    "load_model",
    "capture_rng",
    "restore_rng",
    "temporary",
]
