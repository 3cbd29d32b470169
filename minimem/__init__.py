"""minimem: memory layers for language models, from product keys to UltraMemV2.

The library the course teaches, one module per idea, in course order (the command-line tools,
benchmarks, experiments and grader are in :mod:`minimem_tools`):

====  ===========================  ==========================================================
ch.   module                       what it holds
====  ===========================  ==========================================================
1     ``model``, ``ffn``           the GPT and its feed-forward slot: SwiGLU, mixture of experts
2     ``product_keys``             exact top-m over N = n^2 slots from 2n sub-key scores
3     ``pkm``, ``metrics``         product-key memory; slot usage and KL from uniform
4     ``peer``                     a million singleton experts behind product keys
5     ``tucker``, ``ultramem``     Tucker-decomposed retrieval; UltraMem (MCS, IVE, skip-layer)
6     ``ultramemv2``, ``init``     UltraMemV2; its principled initialisation
7     ``kernels``                  the fused memory lookup: torch reference and Triton kernels
9     ``sharding``                 value tables sharded across ranks (torch.distributed)
all   ``config``, ``data``,        configs; tiny Shakespeare and synthetic tasks; AdamW groups;
      ``optim``, ``train``,        the trainer and its crash-safe checkpoints; parameter, FLOP and
      ``checkpoint``,              byte accounting (chapter 8 compares the layers with it);
      ``accounting``, ``guards``   checks that refuse bad requests before any work
====  ===========================  ==========================================================

The names most chapters use are importable from here (the trainer is ``minimem.train.train``: a
``train`` here would hide the module of that name). Every equation, shape and contract is in
the book's Specification appendix (``book/specification.md``), which the docstrings cite as
"Specification §N".
"""

from minimem.checkpoint import load_model
from minimem.config import (
    Config,
    MemoryConfig,
    ModelConfig,
    MoEConfig,
    PEERConfig,
    PKMConfig,
    TrainConfig,
    UltraMemConfig,
    UltraMemV2Config,
    load_config,
)
from minimem.ffn import MoE
from minimem.kernels import memory_lookup
from minimem.model import GPT
from minimem.peer import PEER
from minimem.pkm import PKM
from minimem.product_keys import brute_force_topk, product_key_topk
from minimem.tucker import tucker_topk
from minimem.ultramem import UltraMem
from minimem.ultramemv2 import UltraMemV2

__version__ = "0.1.0"

__all__ = [
    # chapter 1
    "GPT",
    "MoE",
    # chapter 2
    "product_key_topk",
    "brute_force_topk",
    # chapters 3-6
    "PKM",
    "PEER",
    "tucker_topk",
    "UltraMem",
    "UltraMemV2",
    # chapter 7
    "memory_lookup",
    # every chapter
    "Config",
    "ModelConfig",
    "MoEConfig",
    "MemoryConfig",
    "PKMConfig",
    "PEERConfig",
    "UltraMemConfig",
    "UltraMemV2Config",
    "TrainConfig",
    "load_config",
    "load_model",
]
