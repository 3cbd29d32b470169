"""Configuration dataclasses: loaded from YAML, saved to JSON, overridden with ``--set``.

A run is described by one :class:`Config` holding a :class:`ModelConfig` (the network)
and a :class:`TrainConfig` (the optimisation). Every field has a default, so a YAML file
only names what differs. Unknown keys are errors, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from minimem.memory.config import MemoryConfig

FFN_KINDS = ("dense", "moe")


@dataclass
class MoEConfig:
    """Mixture of experts in the FFN slot (OLMoE-style fine-grained experts)."""

    n_experts: int = 8  # E
    top_k: int = 2  # k experts per token
    d_expert: int = 64  # inner width of one SwiGLU expert
    shared_expert: bool = False  # one always-on expert of width d_expert
    aux_loss_weight: float = 0.01  # load-balance loss weight (Switch/OLMoE form)

    def validate(self) -> None:
        if self.n_experts < 1:
            raise ValueError(f"moe.n_experts must be >= 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"moe.top_k must be between 1 and moe.n_experts={self.n_experts}, got {self.top_k}"
            )
        if self.d_expert < 1:
            raise ValueError(f"moe.d_expert must be >= 1, got {self.d_expert}")


@dataclass
class ModelConfig:
    """The transformer: widths, depth and what fills each block's feed-forward slot."""

    vocab_size: int = 65
    block_size: int = 64  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # h, the model width
    ffn_hidden: int = 344  # SwiGLU inner width (about 8h/3 keeps 2x4h GELU's parameter count)
    ffn: str = "dense"  # "dense" or "moe": what the FFN slot holds
    dropout: float = 0.0
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    moe: MoEConfig = field(default_factory=MoEConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ffn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}"
            )
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(
                f"model.n_embd / model.n_head = {self.n_embd // self.n_head} must be even for rotary positions"
            )
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"model.ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        self.moe.validate()
        self.memory.validate(self)


@dataclass
class TrainConfig:
    """Optimisation, evaluation, checkpointing."""

    dataset: str = "shakespeare"  # see minimem.data.DATASETS
    batch_size: int = 12  # sequences per optimiser step (global, over all DDP ranks)
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    value_lr_mult: float = 1.0  # learning-rate multiplier for memory value / pre-value tables
    value_lr_schedule: str = "constant"  # "constant" or "linear_decay" (multiplier decays to 1x)
    eval_interval: int = 250
    eval_iters: int = 20
    ckpt_interval: int = 500
    log_interval: int = 10
    seed: int = 1337
    out_dir: str = "runs/default"
    device: str = "cpu"
    threads: int = 0  # torch.set_num_threads; 0 keeps torch's default
    dataset_args: dict = field(default_factory=dict)  # extra keyword arguments for the dataset

    def validate(self) -> None:
        for name in ("batch_size", "max_steps", "eval_interval", "eval_iters", "ckpt_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"train.min_lr must be in [0, train.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.value_lr_mult <= 0:
            raise ValueError(f"train.value_lr_mult must be > 0, got {self.value_lr_mult}")
        if self.value_lr_schedule not in ("constant", "linear_decay"):
            raise ValueError(
                "train.value_lr_schedule must be 'constant' or 'linear_decay', "
                f"got {self.value_lr_schedule!r}"
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


# --------------------------------------------------------------------------- loading


def _from_dict(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a dict, rejecting unknown keys with their dotted name."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            raise ValueError(f"unknown config key {name!r}; known keys: {sorted(known)}")
        kind = hints[key]
        if is_dataclass(kind):
            kwargs[key] = _from_dict(kind, value or {}, name)
        else:
            kwargs[key] = _coerce(value, kind, name)
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, name: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any or value is None:
        return value
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return _coerce(value, args[0], name) if args else value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name} must be a boolean (true/false), got {value!r}")
    if kind in (int, float, str):
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be of type {kind.__name__}, got {value!r}") from None
    if origin in (list, tuple) or kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        args = typing.get_args(kind)
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    return value


def config_from_dict(data: dict) -> Config:
    return _from_dict(Config, data, "").validate()


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML (or JSON) config file, apply ``KEY=VALUE`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a config dict.

    The key must exist in the dataclasses: ``--set train.lrr=1`` is an error naming ``train.lrr``.
    """
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        cls = Config
        for i, part in enumerate(parts):
            known = {f.name for f in fields(cls)}
            if part not in known:
                raise ValueError(
                    f"unknown config key {'.'.join(parts[: i + 1])!r} in --set {item!r}; "
                    f"known keys there: {sorted(known)}"
                )
            kind = typing.get_type_hints(cls)[part]
            if i < len(parts) - 1:
                if not is_dataclass(kind):
                    raise ValueError(f"config key {'.'.join(parts[: i + 1])!r} has no sub-keys")
                cls = kind
        parent = data
        for part in parts[:-1]:
            if parent.get(part) is None:
                parent[part] = {}
            parent = parent[part]
        parent[parts[-1]] = yaml.safe_load(raw)
    return data
