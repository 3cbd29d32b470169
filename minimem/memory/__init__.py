"""Memory layers: PKM [PKM], PEER [PEER], UltraMem [UM], UltraMemV2 [UM2].

The model asks three questions of this package, one per placement:
``build_ffn_replacement`` (PKM, PEER: the memory *is* the FFN of its block),
``build_beside_ffn`` (UltraMemV2: beside the FFN, reading its normalised input) and
``build_skip_layers`` (UltraMem: reads before block i, adds after block j > i).
"""
from __future__ import annotations

from minimem.memory.config import MEMORY_KINDS, MemoryConfig


def build_ffn_replacement(config, layer: int):
    """The memory module that replaces block ``layer``'s FFN, or None."""
    if config.memory.kind == "none":
        return None
    raise NotImplementedError(f"memory kind {config.memory.kind!r} is not implemented yet")


def build_beside_ffn(config, layer: int):
    """The memory module added beside block ``layer``'s FFN, or None."""
    return None


def build_skip_layers(config):
    """``([(i, j), ...], [module, ...])`` for skip-layer memories."""
    return [], []


__all__ = ["MEMORY_KINDS", "MemoryConfig", "build_ffn_replacement", "build_beside_ffn", "build_skip_layers"]
