"""Configuration dataclasses: loaded from YAML, saved to JSON, overridden with ``--set``.

A run is described by one :class:`Config` holding a :class:`ModelConfig` (the network)
and a :class:`TrainConfig` (the optimisation). Every field has a default, so a YAML file
only names what differs. Unknown keys, ``null`` values, NaN / infinite floats and absurd sizes
are errors (a :class:`ValueError` with one line naming the field and the fix), never silently
ignored or left to fail deep inside torch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

FFN_KINDS = ("dense", "moe")
# Sane upper bounds: a width, vocabulary or context in the millions, or thousands of layers, is a
# typo (an extra zero, a missing unit), never a model this course trains. Below the bounds,
# whether a model fits depends on the machine, not on the config.
MAX_SIZE = 2**20  # widths, vocabulary, context, batch
MAX_LAYERS = 1024
MAX_SLOTS = 2**30  # memory slots N
MAX_THREADS = 1024


def check_range(where: str, value, low, high=None) -> None:
    """ValueError naming ``where`` unless ``low <= value`` (and ``value <= high`` when given)."""
    if value < low:
        raise ValueError(f"{where} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{where} must be <= {high:,}, got {value:,} (a typo? sizes this large never fit)")


# --------------------------------------------------------------------------- memory layers
# One dataclass per memory kind ([PKM], [PEER], [UM], [UM2]; Specification §1-§4), each with exactly the
# fields its layer reads; ``kind`` picks the class when loading, and a field of another kind is an error.
# ``MemoryConfig`` itself is ``kind="none"``: no memory. Widths left at 0 take the kind's default from the
# model width h (documented per field). Fields shared by kinds keep one default everywhere.

QUERY_NORMS = ("layernorm", "batchnorm", "none")
VALUE_INITS = ("principled", "std0.02", "naive", "paper")
ACTIVATIONS = ("none", "gelu", "relu", "sigmoid", "silu")


def check_choice(where: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{where} must be one of {allowed}, got {value!r}")


def check_square(where: str, value: int, what: str = "") -> None:
    if math.isqrt(value) ** 2 != value:
        raise ValueError(f"{where} must be a perfect square{what}, got {value}")


@dataclass
class MemoryConfig:
    """No memory (``kind: none``); the base of the per-kind classes, each validating its own fields."""

    kind: str = "none"

    def widths(self, h: int) -> tuple[int, int, int]:
        """(D_k, D_v, D_p) with the defaults filled in: the one place they are resolved (here and in
        the subclasses that have the fields): D_k = h/2 (the [UM2] rule), D_v = h, D_p = D_v / 3."""
        return h // 2, h, 0

    def validate(self, model) -> None:  # model: ModelConfig
        if MEMORY_CONFIGS.get(self.kind) is not type(self):
            use = f"; use {MEMORY_CONFIGS[self.kind].__name__}" if self.kind in MEMORY_CONFIGS else ""
            raise ValueError(
                f"model.memory.kind of a {type(self).__name__} must be {type(self).kind!r}, got {self.kind!r}{use}"
            )


@dataclass
class SlotMemoryConfig(MemoryConfig):
    """The fields every memory kind has: N slots read by H heads of top-m key retrieval."""

    n_slots: int = 4096  # N physical slots; must be a perfect square, n = sqrt(N) sub-keys per side
    heads: int = 1  # H retrieval heads (own queries and sub-keys, shared values)
    topk: int = 16  # m slots per token per head
    d_key: int = 0  # D_k query/key width; 0 -> h/2 (the [UM2] rule)
    # softmax over the m scores: [PKM]/[PEER] use it; [UM] removed it (set false, as the ultramem configs do)
    softmax: bool = True

    def widths(self, h: int) -> tuple[int, int, int]:
        return self.d_key or h // 2, getattr(self, "d_value", 0) or h, 0

    def validate(self, model) -> None:
        super().validate(model)
        check_range("model.memory.n_slots", self.n_slots, 1, MAX_SLOTS)
        check_range("model.memory.heads", self.heads, 1, MAX_SIZE)
        for name in ("d_key", "d_value", "d_pre"):  # 0: the kind's default width
            if hasattr(self, name):
                check_range(f"model.memory.{name}", getattr(self, name), 0, MAX_SIZE)
        check_square("model.memory.n_slots", self.n_slots, " (N = n^2)")
        n = math.isqrt(self.n_slots)
        if not 1 <= self.topk <= n:
            raise ValueError(f"model.memory.topk (m) must be in [1, n={n}] where n = sqrt(n_slots), got {self.topk}")
        if self.widths(model.n_embd)[0] % 2 != 0:
            raise ValueError(f"model.memory.d_key must be even (split into two halves), got {self.d_key}")
        for layer in getattr(self, "layers", []):
            if not 0 <= layer < model.n_layer:
                raise ValueError(
                    f"model.memory.layers entries must be in [0, model.n_layer={model.n_layer}), got {layer}"
                )


@dataclass
class PKMConfig(SlotMemoryConfig):
    """Product-key memory [PKM] in the FFN slot of its blocks (:class:`minimem.pkm.PKM`)."""

    kind: str = "pkm"
    layers: list[int] = field(default_factory=list)  # blocks holding a memory; [] -> the middle block
    d_value: int = 0  # D_v value width; 0 -> h
    query_norm: str = "layernorm"  # "layernorm", "batchnorm" ([PKM]) or "none"

    def validate(self, model) -> None:
        super().validate(model)
        check_choice("model.memory.query_norm", self.query_norm, QUERY_NORMS)


@dataclass
class PEERConfig(SlotMemoryConfig):
    """PEER [PEER]: single-neuron experts in the FFN slot of its blocks (:class:`minimem.peer.PEER`)."""

    kind: str = "peer"
    layers: list[int] = field(default_factory=list)  # blocks holding a memory; [] -> the middle block
    query_norm: str = "layernorm"  # "layernorm", "batchnorm" ([PKM]) or "none"
    activation: str = "none"  # expert activation on <u_i, x>

    def validate(self, model) -> None:
        super().validate(model)
        check_choice("model.memory.query_norm", self.query_norm, QUERY_NORMS)
        check_choice("model.memory.activation", self.activation, ACTIVATIONS)


@dataclass
class TuckerMemoryConfig(SlotMemoryConfig):
    """The fields of Tucker-decomposed retrieval with multi-core scoring ([UM] §3.1-3.2)."""

    d_value: int = 0  # D_v value width; 0 -> h
    rank: int = 2  # r, Tucker rank of TDQKR
    cores: int = 2  # c, multi-core scoring cores
    search: str = "tdqkr"  # "tdqkr" (rank-1 candidates), "signed" (top and bottom) or "exact" (all slots)
    candidates: int = 0  # M: TDQKR's candidate rows and columns (an M x M grid), in [m, n_keys]; 0 -> m
    rank1_sign: str = "fixed"  # sign of (u, t): "fixed" (largest |u_a| positive) or "continuous" (official)
    qk_norm: str = "layernorm"  # query / key norm: "layernorm" or "rmsnorm" (the official config)

    def value_blocks(self) -> int:
        """E: value blocks, each with its own output projection (UltraMem's implicit value expansion)."""
        return 1

    def retrieval_options(self) -> dict:
        """The keyword options of :class:`minimem.ultramem.TuckerRetrieval`."""
        return dict(search=self.search, candidates=self.candidates, rank1_sign=self.rank1_sign, qk_norm=self.qk_norm)

    def validate(self, model) -> None:
        super().validate(model)
        check_range("model.memory.rank", self.rank, 1, MAX_SIZE)
        check_range("model.memory.cores", self.cores, 1, MAX_SIZE)
        check_choice("model.memory.search", self.search, ("tdqkr", "signed", "exact"))
        check_choice("model.memory.rank1_sign", self.rank1_sign, ("fixed", "continuous"))
        check_choice("model.memory.qk_norm", self.qk_norm, ("layernorm", "rmsnorm"))
        if self.candidates != 0 and not self.topk <= self.candidates <= MAX_SIZE:  # the layer checks <= n_keys
            raise ValueError(f"model.memory.candidates must be 0 or in [m={self.topk}, n_keys], got {self.candidates}")
        d_value = self.widths(model.n_embd)[1]
        if d_value % self.cores != 0:
            raise ValueError(f"model.memory.d_value={d_value} must be divisible by model.memory.cores={self.cores}")


@dataclass
class UltraMemConfig(TuckerMemoryConfig):
    """UltraMem [UM]: skip-layer memories reading before block i, adding after block j > i."""

    kind: str = "ultramem"
    skip: list[list[int]] = field(default_factory=list)  # [[i, j], ...] read before i, add after j > i
    expansion: int = 4  # E, implicit value expansion (a perfect square)

    def value_blocks(self) -> int:
        return self.expansion

    def validate(self, model) -> None:
        super().validate(model)
        check_range("model.memory.expansion", self.expansion, 1, MAX_SIZE)
        check_square("model.memory.expansion (E)", self.expansion)
        if not self.skip:
            raise ValueError("model.memory.skip must list at least one [i, j] pair for kind 'ultramem'")
        for pair in self.skip:
            if len(pair) != 2:
                raise ValueError(f"model.memory.skip entries must be [i, j] pairs, got {pair}")
            i, j = pair
            if not (0 <= i < model.n_layer and 0 <= j < model.n_layer):
                raise ValueError(f"model.memory.skip pair {pair} must name blocks in [0, {model.n_layer})")
            if j <= i:
                raise ValueError(
                    f"model.memory.skip pair [i, j] = {pair} needs j > i (skip-layer reads at i, adds at j)"
                )


@dataclass
class UltraMemV2Config(TuckerMemoryConfig):
    """UltraMemV2 [UM2] beside the FFN of its blocks (:class:`minimem.ultramemv2.UltraMemV2`)."""

    kind: str = "ultramemv2"
    layers: list[int] = field(default_factory=list)  # blocks holding a memory; [] -> every block
    d_pre: int = 0  # D_p pre-value width; 0 -> d_value / 3 (the 1:3 split)
    ring_group: int = 1  # layers per group sharing one value table in a ring
    share_ratio: int = 0  # s > 0: one table of L N / s rows, layer l's N-row window at l N / s (official); 0: off
    value_init: str = "principled"  # value/pre-value init (minimem.init)
    sigma_s: float = 0.0  # top-m score spread; 0 -> estimated by Monte Carlo at init

    def widths(self, h: int) -> tuple[int, int, int]:
        d_key, d_value, _ = super().widths(h)
        return d_key, d_value, self.d_pre or d_value // 3

    def key_grid_slots(self, group_size: int) -> int:
        """Slots the key grid of a ring group of ``group_size`` layers addresses (a perfect square)."""
        return self.value_blocks() * group_size * self.n_slots

    def validate(self, model) -> None:
        super().validate(model)
        check_range("model.memory.ring_group", self.ring_group, 1, MAX_SIZE)
        check_range("model.memory.share_ratio", self.share_ratio, 0, MAX_SIZE)
        check_range("model.memory.sigma_s", self.sigma_s, 0.0)
        check_choice("model.memory.value_init", self.value_init, VALUE_INITS)
        if UltraMemV2Config.widths(self, model.n_embd)[2] < 1:  # the paper's D_p, in subclasses too
            raise ValueError(f"model.memory.d_pre must be >= 1 (default d_value // 3), got {self.d_pre}")
        layers = sorted(memory_layers(model))
        s, E = self.share_ratio, self.value_blocks()
        if s and (self.ring_group > 1 or len(layers) % s or self.n_slots % s or E > 1):
            raise ValueError(
                f"model.memory.share_ratio={s} must divide the memory layers L={len(layers)} and n_slots="
                f"{self.n_slots}, with model.memory.ring_group 1 (got {self.ring_group}) and one value block (got {E})"
            )
        for size in {len(layers[i : i + self.ring_group]) for i in range(0, len(layers), self.ring_group)}:
            if math.isqrt(slots := self.key_grid_slots(size)) ** 2 != slots:
                raise ValueError(
                    f"the key grid of a {size}-layer ring group addresses {slots} slots, which must be a perfect "
                    "square: use model.memory.ring_group in 1, 4, 9, ... (with n_slots a perfect square)"
                )


MEMORY_CONFIGS = {c.kind: c for c in (MemoryConfig, PKMConfig, PEERConfig, UltraMemConfig, UltraMemV2Config)}
# Every memory field and its default (one per name): what a config saved before the split held for all kinds,
# including the UltraMemV2 ablation switches that now live with the experiments.
MEMORY_DEFAULTS = {f.name: getattr(c(), f.name) for c in MEMORY_CONFIGS.values() for f in fields(c) if f.name != "kind"}
MEMORY_DEFAULTS.update(pre_values=True, value_projections=1)


def memory_layers(config: "ModelConfig") -> list[int]:
    """Blocks that hold a memory for pkm / peer / ultramemv2 (the config's list or the kind's default)."""
    mem = config.memory
    if getattr(mem, "layers", None):
        return list(mem.layers)
    if mem.kind in ("pkm", "peer"):
        return [config.n_layer // 2]
    if isinstance(mem, UltraMemV2Config):
        return list(range(config.n_layer))
    return []


@dataclass
class MoEConfig:
    """Mixture of experts in the FFN slot (OLMoE-style fine-grained experts)."""

    n_experts: int = 8  # E
    top_k: int = 2  # k experts per token
    d_expert: int = 64  # inner width of one SwiGLU expert
    shared_expert: bool = False  # one always-on expert of width d_expert
    aux_loss_weight: float = 0.01  # load-balance loss weight (Switch/OLMoE form)

    def validate(self) -> None:
        check_range("moe.n_experts", self.n_experts, 1, MAX_SIZE)
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"moe.top_k must be between 1 and moe.n_experts={self.n_experts}, got {self.top_k}")
        check_range("moe.d_expert", self.d_expert, 1, MAX_SIZE)
        check_range("moe.aux_loss_weight", self.aux_loss_weight, 0.0)


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
        for name in ("vocab_size", "block_size", "n_head", "n_embd", "ffn_hidden"):
            check_range(f"model.{name}", getattr(self, name), 1, MAX_SIZE)
        check_range("model.n_layer", self.n_layer, 1, MAX_LAYERS)
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(
                f"model.n_embd / model.n_head = {self.n_embd // self.n_head} must be even for rotary positions"
            )
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"model.ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_base <= 0.0:
            raise ValueError(f"model.rope_base must be > 0 (10000 is usual), got {self.rope_base}")
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
    threads: int = 0  # torch.set_num_threads; 0 keeps torch's default (negative is an error)
    dataset_args: dict = field(default_factory=dict)  # extra keyword arguments for the dataset

    def validate(self) -> None:
        for name in ("max_steps", "eval_interval", "eval_iters", "ckpt_interval", "log_interval"):
            check_range(f"train.{name}", getattr(self, name), 1)
        check_range("train.batch_size", self.batch_size, 1, MAX_SIZE)
        if not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(
                f"train.threads must be in [0, {MAX_THREADS}] (0 keeps torch's default), got {self.threads}"
            )
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"train.min_lr must be in [0, train.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        check_range("train.weight_decay", self.weight_decay, 0.0)
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.value_lr_mult <= 0:
            raise ValueError(f"train.value_lr_mult must be > 0, got {self.value_lr_mult}")
        if self.value_lr_schedule not in ("constant", "linear_decay"):
            raise ValueError(
                f"train.value_lr_schedule must be 'constant' or 'linear_decay', got {self.value_lr_schedule!r}"
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


def _null_error(name: str) -> ValueError:
    return ValueError(f"{name} is null; give it a value, or leave the key out to keep its default")


def _from_dict(cls, data: Any, where: str, saved: bool = False):
    """Build dataclass ``cls`` from a dict, rejecting unknown keys with their dotted name."""
    if data is None:
        raise _null_error(where)
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    if cls is MemoryConfig:
        cls, data = _memory_class(data, where, saved)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            raise ValueError(f"unknown config key {name!r}; known keys: {sorted(known)}")
        kind = hints[key]
        if is_dataclass(kind):
            kwargs[key] = _from_dict(kind, value, name, saved)
        else:
            kwargs[key] = _coerce(value, kind, name)
    return cls(**kwargs)


def _memory_class(data: dict, where: str, saved: bool) -> tuple[type, dict]:
    """The class ``data['kind']`` names, and ``data`` without the fields of other kinds that a config
    saved before the per-kind split holds at their defaults (``saved``); any other such field is an error."""
    kind = _coerce(data.get("kind", "none"), str, f"{where}.kind")
    if kind not in MEMORY_CONFIGS:
        raise ValueError(f"{where}.kind must be one of {tuple(MEMORY_CONFIGS)}, got {kind!r}")
    own = sorted(f.name for f in fields(MEMORY_CONFIGS[kind]))
    foreign = [key for key in data if key not in own and key in MEMORY_DEFAULTS]
    for key in foreign:
        if not saved or data[key] != MEMORY_DEFAULTS[key]:
            old = f" and differs from its default {MEMORY_DEFAULTS[key]!r} in this saved config" if saved else ""
            raise ValueError(f"{where}.{key} is not a field of kind {kind!r}{old} (its fields: {', '.join(own)})")
    return MEMORY_CONFIGS[kind], {key: value for key, value in data.items() if key not in foreign}


def _coerce(value: Any, kind: Any, name: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin is typing.Union:  # Optional[X]: null allowed
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return value if value is None or not args else _coerce(value, args[0], name)
    if value is None:
        raise _null_error(name)
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
        if kind is str and isinstance(value, (bool, list, dict)):
            raise ValueError(f"{name} must be a string, got {value!r}")
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be of type {kind.__name__}, got {value!r}") from None
        if kind is float and not math.isfinite(value):  # YAML's .nan / .inf, or "nan" as text
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return value
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


def config_from_dict(data: dict, saved: bool = False) -> Config:
    """A validated :class:`Config` from a dict; ``saved``: a config a run saved (a checkpoint's
    config.json, a results file), read in the older one-class memory format too."""
    return _from_dict(Config, data, "", saved).validate()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line, with its line and column (yaml's own message spans several lines)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is not None:
        problem = getattr(err, "problem", None) or getattr(err, "context", None)
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def load_config(path: str | Path, overrides: Optional[list[str]] = None, saved: bool = False) -> Config:
    """Load a YAML (or JSON) config file, apply ``KEY=VALUE`` overrides, validate.

    Every problem, with the file or an override, raises FileNotFoundError (no such path) or
    ValueError with a one-line message that names the file or field and says how to fix it.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder; give a YAML file, e.g. configs/shakespeare-dense.yaml")
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path} (check the path; configs/ holds the shipped ones)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 YAML"
        ) from None
    except OSError as err:  # unreadable: permissions, a special file
        raise ValueError(f"cannot read config file {path}: {err.strerror}; check its permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if data is None:  # empty, or only comments
        raise ValueError(
            f"config file {path} is empty; give at least one section (model: or train:), "
            "e.g. copy configs/shakespeare-dense.yaml"
        )
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path} must hold a mapping of sections (model:, train:), got a YAML {type(data).__name__}"
        )
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, saved)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a config dict.

    The key must exist in the dataclasses: ``--set train.lrr=1`` is an error naming ``train.lrr``.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set train.lr=2e-3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        cls = Config
        for i, part in enumerate(parts):
            known = set(MEMORY_DEFAULTS) | {"kind"} if cls is MemoryConfig else {f.name for f in fields(cls)}
            if part not in known:
                raise ValueError(
                    f"unknown config key {'.'.join(parts[: i + 1])!r} in --set {item!r}; "
                    f"known keys there: {sorted(known)}"
                )
            kind = typing.get_type_hints(cls).get(part, Any)  # Any: a memory field (not a section)
            if i < len(parts) - 1:
                if not is_dataclass(kind):
                    raise ValueError(f"config key {'.'.join(parts[: i + 1])!r} has no sub-keys")
                cls = kind
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(
                f"--set {item!r}: the value is not valid YAML ({_yaml_problem(err)}); "
                "quote text that holds YAML syntax, e.g. key='[x'"
            ) from None
        parent = data
        for i, part in enumerate(parts[:-1]):
            parent = parent.setdefault(part, {})
            if parent is None:
                raise _null_error(".".join(parts[: i + 1]))
            if not isinstance(parent, dict):
                raise ValueError(f"{'.'.join(parts[: i + 1])} must be a mapping, got {parent!r}")
        parent[parts[-1]] = value
    return data
