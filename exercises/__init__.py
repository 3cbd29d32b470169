"""Graded exercises, two or more per chapter of the course (chapters 1 to 9), and conceptual questions.

Each ``chNN_*.py`` module is a set of stubs: the docstring states the task (shapes, dtypes, the
equation and its paper reference) and the body raises ``NotImplementedError``. Replace the body
with your code, then grade it::

    minimem grade 2              # chapter 2 only (or: pytest exercises/graders/test_ch2.py)
    minimem grade                # every chapter
    minimem grade --reference    # the graders run against minimem's own implementation

The graders (``exercises/graders/test_chN.py``) are pytest tests with points; they draw random
inputs (hypothesis) and compare your function with minimem's and with brute-force checks, so a
hard-coded answer fails, and each has a time limit, so an endless loop fails instead of hanging.
``questions.py`` holds conceptual questions, one or more per chapter, graded with their chapter.
"""

CHAPTERS = {
    1: "ch1_ffn_memory",  # FFN layers are memories: SwiGLU as key-value memory, MoE, memory access
    2: "ch2_product_keys",  # product-key top-m retrieval
    3: "ch3_pkm",  # the PKM layer: usage and KL metrics, query normalisation
    4: "ch4_peer",  # PEER: singleton experts
    5: "ch5_ultramem",  # UltraMem: TDQKR, multi-core scoring, implicit value expansion
    6: "ch6_ultramemv2",  # UltraMemV2: principled init, pre-values, memory compute share
    7: "ch7_triton",  # a fused lookup in Triton: weighted gather kernel, scatter-add backward
    8: "ch8_head_to_head",  # head to head: the verdict rule over seeds, activated and total parameters
    9: "ch9_sharding",  # scaling out: column-sharded value tables, simulated on one process
}
