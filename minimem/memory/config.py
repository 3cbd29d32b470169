"""Configuration of the memory layers (SPEC §1-§4). ``kind="none"`` means no memory."""
from __future__ import annotations

from dataclasses import dataclass, field

MEMORY_KINDS = ("none", "pkm", "peer", "ultramem", "ultramemv2")


@dataclass
class MemoryConfig:
    kind: str = "none"
    layers: list[int] = field(default_factory=list)  # blocks holding a memory; [] = kind's default

    def validate(self, model) -> None:  # model: ModelConfig
        if self.kind not in MEMORY_KINDS:
            raise ValueError(f"model.memory.kind must be one of {MEMORY_KINDS}, got {self.kind!r}")
        for layer in self.layers:
            if not 0 <= layer < model.n_layer:
                raise ValueError(
                    f"model.memory.layers entries must be in [0, model.n_layer={model.n_layer}), got {layer}"
                )
