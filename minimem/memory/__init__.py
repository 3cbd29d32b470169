"""Memory layers: PKM [PKM], PEER [PEER], UltraMem [UM], UltraMemV2 [UM2].

The model asks three questions of this package, one per placement:
``build_ffn_replacement`` (PKM, PEER: the memory *is* the FFN of its block),
``build_beside_ffn`` (UltraMemV2: beside the FFN, reading its normalised input) and
``build_skip_layers`` (UltraMem: reads before block i, adds after block j > i).
"""
from __future__ import annotations

from minimem.memory.config import MEMORY_KINDS, MemoryConfig


def memory_layers(config) -> list[int]:
    """Blocks that hold a memory for pkm / peer / ultramemv2 (the config's list or the kind's default)."""
    mem = config.memory
    if mem.layers:
        return list(mem.layers)
    if mem.kind in ("pkm", "peer"):
        return [config.n_layer // 2]
    if mem.kind == "ultramemv2":
        return list(range(config.n_layer))
    return []


def build_ffn_replacement(config, layer: int):
    """The memory module that replaces block ``layer``'s FFN, or None."""
    kind = config.memory.kind
    if kind not in ("pkm", "peer") or layer not in memory_layers(config):
        return None
    if kind == "pkm":
        from minimem.memory.pkm import PKM

        return PKM(config, layer)
    from minimem.memory.peer import PEER

    return PEER(config, layer)


def build_beside_ffn(config, layer: int):
    """The memory module added beside block ``layer``'s FFN, or None."""
    if config.memory.kind != "ultramemv2" or layer not in memory_layers(config):
        return None
    from minimem.memory.ultramemv2 import UltraMemV2

    return UltraMemV2(config, layer)


def build_skip_layers(config):
    """``([(i, j), ...], [module, ...])`` for skip-layer memories (UltraMem)."""
    if config.memory.kind != "ultramem":
        return [], []
    from minimem.memory.ultramem import UltraMem

    pairs = [tuple(p) for p in config.memory.skip]
    return pairs, [UltraMem(config, i, j) for i, j in pairs]


__all__ = ["MEMORY_KINDS", "MemoryConfig", "memory_layers", "build_ffn_replacement", "build_beside_ffn", "build_skip_layers"]
