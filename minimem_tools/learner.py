"""UltraMemV2 built from the learner's own exercise solutions: the course's capstone.

    minimem train --config configs/shakespeare-ultramemv2.yaml --use-exercises             # ./exercises
    minimem train --config configs/shakespeare-ultramemv2.yaml --use-exercises DIR         # a copy from
                                                                                           # `minimem exercises init`
    minimem train --config configs/shakespeare-ultramemv2.yaml --use-exercises reference   # the reference solutions

    with learner.use_exercises("learner"):      # in Python: every UltraMemV2 built inside is the learner's
        train(config, out_dir=..., overwrite=True)

The model is the package's UltraMemV2 with the learner's functions at the three places where the
course had them write the layer's mechanism:

- exercise 5.2 ``tucker_topk`` (which calls 5.1 ``rank1_core``): TDQKR's candidate search, plugged in as
  :attr:`minimem.ultramem.TuckerRetrieval.search` (the score calibration at initialisation still uses
  the package's search, so that the learner's model starts from the package's weights);
- exercise 6.1 ``principled_value_std``: the std of the value and pre-value tables;
- exercise 6.2 ``prevalue_read``: the read with pre-values and the single output projection.

Everything else (queries, keys, norms, shuffle, ring tables, the rest of the transformer) is the
package's, so a learner's model trained with the reference solutions matches the package's own
up to floating-point rounding, and a wrong solution shows up as a worse loss or a crash.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Iterator

import torch

from minimem.config import UltraMemV2Config
from minimem.init import ffn_output_variance
from minimem.model import BESIDE_FFN
from minimem.ultramemv2 import UltraMemV2
from minimem_tools import course

# chapter module -> the functions the learner's UltraMemV2 takes from it
USED = {"ch5_ultramem": ("tucker_topk",), "ch6_ultramemv2": ("principled_value_std", "prevalue_read")}


def _module_from_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the learner's file runs here: its errors are theirs
    return module


def load_solutions(source: str | Path = "learner") -> SimpleNamespace:
    """The functions of :data:`USED` from ``source``: "learner" (./exercises, or the course's copy),
    "reference" (the course's reference solutions) or an exercises folder."""
    from minimem_tools.grading import exercises_folder, find_exercises_dir

    found = {}
    if str(source) == "reference":
        root = str(course.path("exercises").parent)  # the reference imports the package ``exercises``
        if root not in sys.path:
            sys.path.append(root)
        reference = importlib.import_module("exercises.reference")
        for chapter, names in USED.items():
            found.update({name: getattr(reference.namespace(chapter), name) for name in names})
        return SimpleNamespace(**found, source="reference")
    folder = find_exercises_dir() if str(source) == "learner" else exercises_folder(source, "--use-exercises")
    for chapter, names in USED.items():
        module = _module_from_file(folder / f"{chapter}.py", f"minimem_learner_{chapter}")
        found.update({name: getattr(module, name) for name in names})
    return SimpleNamespace(**found, source=str(folder))


class LearnerUltraMemV2(UltraMemV2):
    """:class:`UltraMemV2` whose search, table std and read are the learner's (module docstring)."""

    solutions: SimpleNamespace  # set on the subclass that :func:`use_exercises` makes

    def __init__(self, config, layer: int, table=None):
        super().__init__(config, layer, table)  # initialised with the learner's table std (table_std)
        self.retrieval.search = self.search

    def search(self, s_row, s_col, cores, m, u=None, t=None):
        # exercise 5.2 recomputes the rank-1 factors (u, t) from the cores itself (exercise 5.1)
        return self.solutions.tucker_topk(s_row, s_col, cores, m)

    def table_std(self) -> float:
        if self.config.memory.value_init != "principled":
            return super().table_std()
        args = (ffn_output_variance(self.config), self.sigma_s, self.d_pre, self.d_value, self.topk, self.heads)
        return float(self.solutions.principled_value_std(*args, self.config.n_embd, self.score_mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(B * T, h)
        scores, slots = self.retrieval(flat)  # (BT, Hm, c), (BT, Hm): the learner's search inside
        rows = self.table_rows_of(slots)
        px = self.pre_proj(flat)  # (BT, D_p)
        out = self.solutions.prevalue_read(
            self.table.values, self.table.pre_values, rows, scores, px, self.out_proj.weight
        )
        self.record(rows, scores, B, T)
        return out.view(B, T, h)


@contextlib.contextmanager
def use_exercises(source: str | Path = "learner") -> Iterator[SimpleNamespace]:
    """Inside, every model built with ``kind: ultramemv2`` is :class:`LearnerUltraMemV2` with the
    solutions of ``source`` (see :func:`load_solutions`); models built inside keep them afterwards."""
    solutions = load_solutions(source)
    layer_class = type("LearnerUltraMemV2", (LearnerUltraMemV2,), {"solutions": solutions})
    saved = BESIDE_FFN[UltraMemV2Config]
    BESIDE_FFN[UltraMemV2Config] = layer_class
    try:
        yield solutions
    finally:
        BESIDE_FFN[UltraMemV2Config] = saved


def is_learners(model: torch.nn.Module) -> bool:
    """True when every UltraMemV2 layer of ``model`` is the learner's."""
    layers = [m for m in model.modules() if isinstance(m, UltraMemV2)]
    return bool(layers) and all(isinstance(m, LearnerUltraMemV2) for m in layers)


__all__ = ["use_exercises", "load_solutions", "LearnerUltraMemV2", "is_learners", "USED"]
