"""UltraMemV2 (and PKM, PEER) built from the learner's own exercise solutions: the course's capstone.

    minimem train --config configs/shakespeare-ultramemv2.yaml --use-exercises             # ./exercises
    minimem train --config configs/shakespeare-ultramemv2.yaml --use-exercises DIR         # a copy from
                                                                                           # `minimem exercises init`
    minimem train --config configs/shakespeare-ultramemv2.yaml --use-exercises reference   # the reference solutions
    minimem train --config configs/shakespeare-pkm.yaml --use-exercises                    # PKM (or PEER): exercise 2.2
    minimem train --config ... --use-exercises --use-exercises-kernels --set train.device=cuda   # + 7.1, 7.2

    with learner.use_exercises("learner"):      # in Python: every memory layer built inside is the learner's
        train(config, out_dir=..., overwrite=True)
    with learner.use_exercises("learner", kernels=True):   # the read's weighted sum in the learner's kernels
        ...

The model is the package's, with the learner's functions at the places where the course had them
write the layer's mechanism:

- exercise 2.2 ``product_key_topk`` (``ch2_product_keys.py``): the top-m search of PKM and PEER
  (``kind: pkm`` / ``peer``), called once per head, plugged in as
  :attr:`minimem.pkm.ProductKeyRouter.search`;
- exercise 5.2 ``tucker_topk`` (``ch5_ultramem.py``, which calls 5.1 ``rank1_core``): UltraMemV2's
  TDQKR candidate search, plugged in as :attr:`minimem.ultramem.TuckerRetrieval.search` (the score
  calibration at initialisation still uses the package's search, so that the learner's model starts
  from the package's weights);
- exercise 6.1 ``principled_value_std`` (``ch6_ultramemv2.py``): the std of the value and pre-value tables;
- exercise 6.2 ``prevalue_read`` (``ch6_ultramemv2.py``): the read with pre-values and the single
  output projection;
- with ``kernels=True`` (``--use-exercises-kernels``), exercises 7.1 ``weighted_gather`` and 7.2
  ``weighted_gather_backward`` (``ch7_triton.py``): the weighted sum of the selected value rows, as
  the forward and backward of one ``torch.autograd.Function`` (:class:`WeightedGather`), in PKM and
  PEER (:attr:`minimem.pkm.ProductKeyRouter.lookup`) and in UltraMemV2, where it replaces 6.2's read
  (the pre-value gates and the output projection are then the package's, and each scoring core's
  slice of a value row is one row of the table seen as (N c, D_v / c)). The kernels run on CUDA
  tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter: a test, far too
  slow to train); other CPU tensors take the torch read. The command line asks for ``train.device`` cuda.

Everything else (queries, keys, norms, shuffle, ring tables, the rest of the transformer) is the
package's, so a learner's model trained with the reference solutions matches the package's own
up to floating-point rounding, and a wrong solution shows up as a worse loss or a crash. A stub
still raising NotImplementedError ("exercise 2.2: write ...") stops ``minimem train`` with that one line.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Iterator

import torch
from torch.autograd.function import once_differentiable

from minimem.config import PEERConfig, PKMConfig, UltraMemV2Config
from minimem.init import ffn_output_variance
from minimem.kernels import lookup_dtype, memory_lookup
from minimem.model import BESIDE_FFN, IN_FFN
from minimem.peer import PEER
from minimem.pkm import PKM, ProductKeyRouter
from minimem.ultramemv2 import UltraMemV2
from minimem_tools import course

# chapter module -> the functions the learner's layers take from it; KERNELS only with kernels=True
USED = {
    "ch2_product_keys": ("product_key_topk",),
    "ch5_ultramem": ("tucker_topk",),
    "ch6_ultramemv2": ("principled_value_std", "prevalue_read"),
}
KERNELS = {"ch7_triton": ("weighted_gather", "weighted_gather_backward")}
CONFIGS = (UltraMemV2Config, PKMConfig, PEERConfig)  # the memory kinds the switch builds


def _module_from_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the learner's file runs here: its errors are theirs
    return module


def load_solutions(source: str | Path = "learner", kernels: bool = False) -> SimpleNamespace:
    """The functions of :data:`USED` (and :data:`KERNELS` with ``kernels``) from ``source``: "learner"
    (./exercises, or the course's copy), "reference" (the course's reference solutions) or an exercises folder."""
    from minimem_tools.grading import exercises_folder, find_exercises_dir

    chapters = {**USED, **KERNELS} if kernels else USED
    found = {}
    if str(source) == "reference":
        root = str(course.path("exercises").parent)  # the reference imports the package ``exercises``
        if root not in sys.path:
            sys.path.append(root)
        reference = importlib.import_module("exercises.reference")
        for chapter, names in chapters.items():
            found.update({name: getattr(reference.namespace(chapter), name) for name in names})
        return SimpleNamespace(**found, source="reference", kernels=kernels)
    folder = find_exercises_dir() if str(source) == "learner" else exercises_folder(source, "--use-exercises")
    for chapter, names in chapters.items():
        module = _module_from_file(folder / f"{chapter}.py", f"minimem_learner_{chapter}")
        found.update({name: getattr(module, name) for name in names})
    return SimpleNamespace(**found, source=str(folder), kernels=kernels)


# --------------------------------------------------------------------------- the kernels (exercises 7.1, 7.2)


class WeightedGather(torch.autograd.Function):
    """out[t] = sum_i scores[t, i] values[indices[t, i]]: forward exercise 7.1, backward exercise 7.2."""

    @staticmethod
    def forward(ctx, solutions, values, indices, scores):
        ctx.solutions = solutions
        ctx.save_for_backward(values, indices, scores)
        return solutions.weighted_gather(values, indices, scores)  # (T, D_v)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        values, indices, scores = ctx.saved_tensors
        grad_values, grad_scores = ctx.solutions.weighted_gather_backward(
            grad_out.contiguous(), values, indices, scores
        )
        return None, grad_values, None, grad_scores


def runs_kernels(solutions: SimpleNamespace, t: torch.Tensor) -> bool:
    """Whether the read of ``t``'s device goes through the learner's kernels (module docstring)."""
    return solutions.kernels and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def kernel_lookup(solutions, values, indices, scores, pre_values=None, pre_input=None) -> torch.Tensor:
    """:func:`minimem.kernels.memory_lookup` (Specification §6) with the weighted sum in the learner's kernels.

    values (N, D_v), indices (T, m), scores (T, m, c), pre_values (N, D_p), pre_input (T, D_p) -> (T, D_v).
    The gates g = <pre_values[idx], pre_input> fold into the weights s_k g; slice k of row r is row r c + k
    of the table seen as (N c, D_v / c), so the c cores are c T bags of m rows for the one-core kernel.
    """
    (T, m), cores, d_value = indices.shape, scores.shape[-1], values.shape[1]
    dtype = lookup_dtype(values, scores, pre_values, pre_input)
    weights = scores.float()  # (T, m, c): the kernels take float32
    if pre_values is not None:
        gate = (pre_values[indices].float() * pre_input.float().unsqueeze(1)).sum(-1)  # (T, m)
        weights = weights * gate.unsqueeze(-1)
    bags = indices * cores + torch.arange(cores, device=indices.device).view(cores, 1, 1)  # (c, T, m)
    table = values.float().reshape(-1, d_value // cores)  # (N c, D_v / c)
    weights = weights.permute(2, 0, 1).reshape(cores * T, m).contiguous()  # (c T, m)
    out = WeightedGather.apply(solutions, table, bags.reshape(cores * T, m), weights)  # (c T, D_v / c)
    return out.view(cores, T, -1).transpose(0, 1).reshape(T, d_value).to(dtype)


# --------------------------------------------------------------------------- the learner's layers


class LearnerRouter:
    """Mixin for :class:`PKM` and :class:`PEER`: the learner's top-m search (2.2) and, with kernels, read."""

    solutions: SimpleNamespace  # set on the subclass that :func:`use_exercises` makes

    def search(self, q, keys1, keys2, m: int):
        """q (T, H, D_k), keys1 and keys2 (H, n, D_k/2) -> scores, indices (T, H, m): exercise 2.2 per head."""
        half = q.shape[-1] // 2
        heads = [
            self.solutions.product_key_topk(q[:, k, :half], q[:, k, half:], keys1[k], keys2[k], m)
            for k in range(q.shape[1])
        ]
        return torch.stack([s for s, _ in heads], 1), torch.stack([i for _, i in heads], 1)

    def lookup(self, values, indices, scores, pre_values=None, pre_input=None):
        if runs_kernels(self.solutions, values):
            return kernel_lookup(self.solutions, values, indices, scores, pre_values, pre_input)
        return memory_lookup(values, indices, scores, pre_values, pre_input)


class LearnerPKM(LearnerRouter, PKM):
    """:class:`PKM` with the learner's search (and read): module docstring."""


class LearnerPEER(LearnerRouter, PEER):
    """:class:`PEER` with the learner's search (and read): module docstring."""


class LearnerUltraMemV2(UltraMemV2):
    """:class:`UltraMemV2` whose search, table std and read are the learner's (module docstring)."""

    solutions: SimpleNamespace  # set on the subclass that :func:`use_exercises` makes

    def __init__(self, config, layer: int, table=None):
        mem = config.memory
        if mem.search != "tdqkr" or mem.candidates:  # exercise 5.2 is the plain m x m TDQKR search
            raise ValueError(
                "--use-exercises: exercise 5.2's tucker_topk is the plain TDQKR search; leave "
                f"model.memory.search (got {mem.search!r}) and model.memory.candidates (got {mem.candidates}) unset"
            )
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
        if runs_kernels(self.solutions, flat):  # exercises 7.1, 7.2 in place of 6.2's read
            read = kernel_lookup(self.solutions, self.table.values, rows, scores, self.table.pre_values, px)
            out = self.out_proj(read)
        else:
            values, pre_values, w_out = self.table.values, self.table.pre_values, self.out_proj.weight
            out = self.solutions.prevalue_read(values, pre_values, rows, scores, px, w_out)
        self.record(rows, scores, B, T)
        return out.view(B, T, h)


@contextlib.contextmanager
def use_exercises(source: str | Path = "learner", kernels: bool = False) -> Iterator[SimpleNamespace]:
    """Inside, every model built with ``kind: ultramemv2``, ``pkm`` or ``peer`` has the learner's layers
    (:class:`LearnerUltraMemV2`, :class:`LearnerPKM`, :class:`LearnerPEER`) with the solutions of ``source``
    (see :func:`load_solutions`), and with ``kernels`` the read in the learner's Triton kernels; models
    built inside keep them afterwards."""
    solutions = load_solutions(source, kernels)
    made = {"solutions": solutions}
    saved = BESIDE_FFN[UltraMemV2Config], IN_FFN[PKMConfig], IN_FFN[PEERConfig]
    BESIDE_FFN[UltraMemV2Config] = type("LearnerUltraMemV2", (LearnerUltraMemV2,), made)
    IN_FFN[PKMConfig] = type("LearnerPKM", (LearnerPKM,), made)
    IN_FFN[PEERConfig] = type("LearnerPEER", (LearnerPEER,), made)
    try:
        yield solutions
    finally:
        BESIDE_FFN[UltraMemV2Config], IN_FFN[PKMConfig], IN_FFN[PEERConfig] = saved


def is_learners(model: torch.nn.Module) -> bool:
    """True when every memory layer (UltraMemV2, PKM, PEER) of ``model`` is the learner's."""
    layers = [m for m in model.modules() if isinstance(m, (UltraMemV2, ProductKeyRouter))]
    return bool(layers) and all(isinstance(m, (LearnerUltraMemV2, LearnerRouter)) for m in layers)


__all__ = [
    "use_exercises",
    "load_solutions",
    "LearnerUltraMemV2",
    "LearnerPKM",
    "LearnerPEER",
    "WeightedGather",
    "kernel_lookup",
    "is_learners",
    "USED",
    "KERNELS",
    "CONFIGS",
]
