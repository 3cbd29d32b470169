"""Conceptual questions about the mechanisms, one or more per chapter: answer them in ANSWERS.

Replace each ``None`` in :data:`ANSWERS` with your answer, then grade it with the chapter
(``minimem grade 2`` grades chapter 2's exercises and questions). Two kinds of answer:

- a number (an int, a float or a string such as "1.5e6"): graded after rounding to 3
  significant figures, so 56.44 and 56.4 are the same answer;
- the letter of an option ("b").

Work the answer out from the chapter, the Specification and minimem's code; a calculator is
fine. The graders hold only a salted SHA-256 hash of each right answer (so the answers are not in
the repository in clear): they can say right or wrong, never what the right answer is.
"""

from __future__ import annotations

QUESTIONS = {
    # chapter 1: FFN layers are memories
    "1a": "A MoE layer with E = 64 experts and top-8 routing runs a batch of B = 16 tokens. Under uniform "
    "routing, how many distinct experts does the batch read, in expectation?",
    "1b": "Read SwiGLU as a key-value memory, FFN(x) = W2 (silu(W1 x) * (W3 x)) = sum_i silu(<k_i, x>) <g_i, x> v_i "
    "(nn.Linear layouts). Where are the value vectors v_i?  a) the rows of W1  b) the rows of W3  "
    "c) the columns of W2  d) the rows of W2",
    # chapter 2: product keys
    "2a": "Product keys with n = 512 sub-keys per side (N = n^2 slots) and top-m = 32: per query (and head), "
    "exact top-m retrieval scores the 2n sub-keys and then the m x m candidate grid. How many times fewer "
    "scores is that than scoring all N slots?",
    # chapter 3: the PKM layer
    "3a": "A PKM with N = 262144 slots (n = 512) that always selects the same slot: what is the KL divergence "
    "of its slot usage from uniform, in nats?",
    "3b": "Which query normalisation makes one token's retrieval depend on the other tokens of the batch, "
    "later positions of its own sequence included?  a) layernorm  b) batchnorm  c) none",
    # chapter 4: PEER
    "4a": "A PEER layer and a PKM layer with the same N slots, model width h and value width D_v = h: how many "
    "times as many parameters does PEER's expert table (down and up vectors) hold as PKM's value table?",
    # chapter 5: UltraMem
    "5a": "TDQKR selects candidates with the rank-1 approximation C ~ sigma u t^T of the Tucker core. For "
    "C = [[3, 0], [4, 0]] (rows), what is sigma?",
    # chapter 6: UltraMemV2
    "6a": "UltraMemV2's principled initialisation: by what factor does sigma_V change when D_p is doubled, "
    "everything else fixed?",
    "6b": "Ring sharing: the 9 memory layers of a ring group share one value table of 9 N rows, which every layer "
    "of the group addresses with its own key grid. By what factor does each layer's number of sub-keys per "
    "side n grow, compared with a layer that addresses its own N rows?",
    # chapter 7: a fused lookup in Triton
    "7a": "A lookup with T = 1024 tokens, m = 32 slots and D_v = 256 float32 value columns: how many MB "
    "(10^6 bytes) of value rows does it read?",
    # chapter 8: head to head
    "8a": "Validation loss over 5 seeds each: A 2.10 +- 0.03, B 2.14 +- 0.03 (mean +- sample std). The course's "
    "verdict on 'A beats B' (exercise 8.1's rule)?  a) reproduced  b) not reproduced  c) inconclusive",
    "8b": "A PKM with N = 262144 slots, H = 4 heads and top-m = 32: what fraction of its value table does one "
    "token read?",
    # chapter 9: scaling out
    "9a": "Value tables column-sharded over P = 4 ranks with c = 3 scoring cores: the smallest D_v the layout allows?",
    "9b": "The sharded lookup with T = 8192 tokens per rank, m = 128 and P = 8 ranks: how many MB (10^6 bytes) "
    "does each rank send to all-gather the int64 indices, per lookup?",
}

ANSWERS = {
    "1a": None,
    "1b": None,
    "2a": None,
    "3a": None,
    "3b": None,
    "4a": None,
    "5a": None,
    "6a": None,
    "6b": None,
    "7a": None,
    "8a": None,
    "8b": None,
    "9a": None,
    "9b": None,
}
