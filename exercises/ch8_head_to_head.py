"""Chapter 8 exercises: head to head, on equal terms and with an honest verdict.

Fill in each function, then grade them with ``minimem grade 8``. Chapter 8 compares dense, MoE and
memory models at equal *activated* parameters (equal compute per token) and at equal *total*
parameters (equal storage), and reads every comparison over several seeds with one fixed rule
(``minimem_tools.experiments.claims``). These two exercises are those two tools.
"""

from __future__ import annotations

from typing import Sequence


def verdict(a: Sequence[float], b: Sequence[float], lower: bool = True) -> str:
    """Exercise 8.1: the verdict on the claim "A beats B" from per-seed measurements ([claims] rule).

    ``a`` and ``b``: one metric's value per seed for model A and model B (a list, tuple or 1-D
    tensor of real numbers); ``lower``: True when lower is better (a loss), False when higher is
    (an accuracy). Non-finite values (a diverged run's NaN or inf loss) are left out. Then:

        not run          when a or b has no finite value left
        inconclusive     when a or b has fewer than 2 (one seed has no spread)
        otherwise        mean, sample standard deviation s (ddof = 1) and count n of each,
                         gain = mean_b - mean_a  (lower is better)  or  mean_a - mean_b,
                         SE   = sqrt(s_a^2 / n_a + s_b^2 / n_b)   (standard error of the difference),
                         "reproduced" if gain > 2 SE, "not reproduced" if -gain > 2 SE,
                         "inconclusive" otherwise (a difference within 2 SE is no result; about a
                         two-sided 95% test).

    Return one of the strings "reproduced", "not reproduced", "inconclusive", "not run".
    Raise ValueError naming ``a`` (or ``b``) unless it is a sequence of real numbers (a string,
    a 2-D tensor or a list holding a string is not), and naming ``lower`` unless it is a bool.
    (minimem: ``minimem_tools.experiments.claims.better`` on ``runner.mean_std`` of each.)
    """
    raise NotImplementedError("exercise 8.1: write verdict in exercises/ch8_head_to_head.py")


def layer_parameters(
    kind: str, h: int, n_keys: int, heads: int, d_key: int, topk: int, query_norm: str = "layernorm"
) -> dict:
    """Exercise 8.2: total and activated parameters of one PKM or PEER layer (minimem's accounting).

    ``kind`` "pkm" ([PKM]: a value table of N = n^2 rows of width h) or "peer" ([PEER]: N experts,
    each a down and an up vector of width h); n = ``n_keys`` sub-keys per side, H = ``heads``,
    D_k = ``d_key`` (even), m = ``topk`` (1 <= m <= n), model width h. Both have the same
    product-key router:

        W_q            h H D_k          (the queries of all heads)
        query norm     2 D_k            ("layernorm": gain and bias shared by the heads)
                       2 H D_k          ("batchnorm": over all H D_k query features)
                       0                ("none")
        sub-keys       H n D_k          (two tables of n x D_k/2 per head)

    ``total`` is the router plus the whole table; ``activated`` (what one token reads) is the
    router plus the H m table rows it selects (a row is h parameters for PKM, 2h for PEER).
    Return ``{"total": int, "activated": int}``. Raise ValueError naming the argument for: a
    kind other than "pkm" or "peer" (naming both), h, n_keys or heads < 1, d_key < 2 or odd,
    topk outside [1, n_keys], an unknown query_norm (naming the three allowed values).
    (minimem: ``minimem.accounting.count_parameters`` and ``memory_layer_parameters``.)
    """
    raise NotImplementedError("exercise 8.2: write layer_parameters in exercises/ch8_head_to_head.py")
