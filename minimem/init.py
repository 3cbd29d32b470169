"""Principled initialisation of UltraMemV2's value tables [UM2] Appendix A (Specification §4.4).

Idea: at initialisation the memory branch beside the FFN should add as much variance to the
residual stream as the FFN does. Assumptions of [UM2]: the memory input x has unit variance;
memory linear weights have std sqrt(2 / (5h)) (so a product with a unit-variance vector of
width h has variance 0.4); the query/key norms make the mean top-m score 1, with relative
spread sigma_s (E[s^2] = 1 + sigma_s^2). Then, with px = W_p x (variance 0.4 per entry) and
value and pre-value entries of variance sigma_V^2:

    <P_i, px>                         variance 0.4 D_p sigma_V^2
    sum_{H heads, m slots} s_i <P_i, px> V_i    variance m H (1 + sigma_s^2) 0.4 D_p sigma_V^4
    o = W^T (...)   (D_v -> h)        sigma_mem^2 = 0.16 (1 + sigma_s^2) sigma_V^4 D_p m H D_v / h

and [UM2] takes the FFN's output variance as sigma_ffn^2 = 0.064 k_inner / (2L)
(k_inner = FFN width / h). Solving sigma_mem^2 = sigma_ffn^2:

    sigma_V^4 = sigma_ffn^2 h / (0.16 (1 + sigma_s^2) D_p m H D_v)
              = 0.2 k_inner h / (m H (1 + sigma_s^2) D_p D_v L)        (paper's sigma_ffn^2)

sigma_V^2 vs sigma_V^4: the extracted paper text prints sigma_V^2 on the left. sigma_V enters
the output twice (pre-value and value), so the output variance is quartic in sigma_V and only
the fourth root matches the variances. Measured through the real layer with its calibrated
retrieval (``tests/test_init.py``; h = 128, shapes (D_p, D_v, m, H) = (16, 48, 16, 1),
(32, 96, 8, 2), (8, 64, 24, 1), four seeds each): with the fourth root the memory / FFN variance
ratio is 0.92 to 1.05, and the App. A model above predicts the measured variance within 10%;
with the printed square root the ratio is 1e-7 to 5e-7 (the output variance is multiplied by
sigma_V^4 itself), i.e. the memory branch starts silent. This package uses the fourth root
(``value_init="principled"``) and keeps the printed form as ``value_init="paper"``.

Which FFN: minimem's GPT initialises its FFN with GPT-2's scheme (std 0.02, output projection
0.02 / sqrt(2L)), not with sqrt(2 / (5h)), so [UM2]'s sigma_ffn^2 formula would overshoot the
actual FFN branch by orders of magnitude. The principle ("match the FFN beside you") is kept and
applied to the FFN that is really there: :func:`ffn_output_variance` computes its variance at
init for a unit-variance input (Gaussian pre-activations; Gauss-Hermite quadrature for SwiGLU,
Monte Carlo over router logits for a MoE). :func:`paper_ffn_variance` is [UM2]'s formula, for the book and for
models that use the paper's linear init.

sigma_s is estimated by :func:`estimate_score_moments` through the layer's actual retrieval
on random unit-variance inputs; the layer first rescales its query/key norm gains so that the
mean top-m score is 1 (Specification §4.4). With multi-core scoring the score that multiplies a value
entry is a core's own score, so the moments are those of the per-core scores.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

LINEAR_GAIN = 0.4  # h * (2 / (5h)): variance gain of a linear layer with the paper's init
GPT2_STD = 0.02  # minimem.model.GPT.reset_parameters: N(0, 0.02), residual projections / sqrt(2L)


def linear_std(dim: int) -> float:
    """[UM2]'s std for memory linear weights: sqrt(2 / (5h))."""
    return math.sqrt(2.0 / (5.0 * dim))


def paper_ffn_variance(k_inner: float, n_layer: int) -> float:
    """[UM2] App. A: sigma_ffn^2 = 0.064 k_inner / (2L) (paper's linear init)."""
    return 0.064 * k_inner / (2 * n_layer)


@functools.lru_cache(maxsize=None)
def _hermite_nodes(points: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.hermite_e.hermegauss(points)


def _gaussian_expectation(f, variance: float, points: int = 64) -> float:
    """E[f(Z)] for Z ~ N(0, variance), by Gauss-Hermite quadrature."""
    z, w = _hermite_nodes(points)
    return float(np.sum(w * f(math.sqrt(variance) * z)) / math.sqrt(2 * math.pi))


def swiglu_output_variance(dim: int, hidden: int, std_in: float, std_out: float) -> float:
    """Output variance of W2 (silu(W1 x) * W3 x) for unit-variance x, weights N(0, std^2).

    a = W1 x and b = W3 x are independent N(0, dim std_in^2); the output sums ``hidden``
    independent terms w2 silu(a) b, so var = hidden std_out^2 E[silu(a)^2] E[b^2].
    """
    var_ab = dim * std_in**2
    silu_sq = _gaussian_expectation(lambda a: (a / (1 + np.exp(-a))) ** 2, var_ab)
    return hidden * std_out**2 * silu_sq * var_ab


def _moe_routed_weight(dim: int, n_experts: int, top_k: int, samples: int = 20000, seed: int = 0) -> float:
    """E[sum of the squared top-k router probabilities] with router weights N(0, 0.02^2)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(samples, n_experts, generator=gen, dtype=torch.float64) * (GPT2_STD * math.sqrt(dim))
    top = torch.softmax(logits, dim=-1).topk(top_k, dim=-1).values
    return float((top**2).sum(-1).mean())


def ffn_output_variance(model_config) -> float:
    """Variance at init of the FFN slot's output in minimem's GPT, for unit-variance input.

    Dense SwiGLU, or MoE: sum over the top-k experts of p_e y_e with independent expert outputs
    y_e, plus the shared expert. GPT-2 init (``minimem.model.GPT.reset_parameters``,
    ``minimem.ffn.MoE.reset_memory_parameters``).
    """
    h, L = model_config.n_embd, model_config.n_layer
    out_std = GPT2_STD / math.sqrt(2 * L)
    if model_config.ffn == "dense":
        return swiglu_output_variance(h, model_config.ffn_hidden, GPT2_STD, out_std)
    if model_config.ffn != "moe":
        raise ValueError(f"model.ffn must be 'dense' or 'moe', got {model_config.ffn!r}")
    moe = model_config.moe
    expert = swiglu_output_variance(h, moe.d_expert, GPT2_STD, out_std)
    variance = _moe_routed_weight(h, moe.n_experts, moe.top_k) * expert
    if moe.shared_expert:
        variance += expert
    return variance


def memory_output_variance(
    sigma_v: float, sigma_s: float, d_pre: int, d_value: int, topk: int, heads: int, dim: int, score_mean: float = 1.0
) -> float:
    """sigma_mem^2 = 0.16 mu^2 (1 + sigma_s^2) sigma_V^4 D_p m H D_v / h  ([UM2] App. A, mu = 1)."""
    second_moment = score_mean**2 * (1.0 + sigma_s**2)  # E[s^2]
    return LINEAR_GAIN**2 * second_moment * sigma_v**4 * d_pre * topk * heads * d_value / dim


def _check_init_arguments(sigma_s: float, **positive: float) -> None:
    """ValueError naming the argument: every ``positive`` one must be > 0, ``sigma_s`` >= 0."""
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if sigma_s < 0:
        raise ValueError(f"sigma_s must be >= 0, got {sigma_s}")


def _variance_ratio(target_variance, sigma_s, d_pre, d_value, topk, heads, dim, score_mean) -> float:
    """sigma_V^4 that makes :func:`memory_output_variance` equal ``target_variance``."""
    _check_init_arguments(
        sigma_s,
        target_variance=target_variance,
        d_pre=d_pre,
        d_value=d_value,
        topk=topk,
        heads=heads,
        dim=dim,
        score_mean=score_mean,
    )
    return target_variance / memory_output_variance(1.0, sigma_s, d_pre, d_value, topk, heads, dim, score_mean)


def principled_value_std(
    target_variance: float,
    sigma_s: float,
    d_pre: int,
    d_value: int,
    topk: int,
    heads: int,
    dim: int,
    score_mean: float = 1.0,
) -> float:
    """sigma_V = (sigma_ffn^2 h / (0.16 (1 + sigma_s^2) D_p m H D_v))^(1/4): values and pre-values."""
    return _variance_ratio(target_variance, sigma_s, d_pre, d_value, topk, heads, dim, score_mean) ** 0.25


def printed_value_std(
    target_variance: float,
    sigma_s: float,
    d_pre: int,
    d_value: int,
    topk: int,
    heads: int,
    dim: int,
    score_mean: float = 1.0,
) -> float:
    """The formula as the extracted paper text prints it: sigma_V^2 = (same right-hand side)."""
    return _variance_ratio(target_variance, sigma_s, d_pre, d_value, topk, heads, dim, score_mean) ** 0.5


def plain_value_std(
    target_variance: float,
    sigma_s: float,
    d_value: int,
    topk: int,
    heads: int,
    dim: int,
    score_mean: float = 1.0,
) -> float:
    """Value std without pre-values (ablation): o = W^T sum_i s_i V_i has variance
    0.4 mu^2 (1 + sigma_s^2) sigma_V^2 m H D_v / h, so sigma_V^2 = sigma_ffn^2 h / (0.4 mu^2 (1 + sigma_s^2) m H D_v).

    The same derivation as the module docstring with the gate <P_i, px> removed: sigma_V enters once.
    """
    _check_init_arguments(
        sigma_s,
        target_variance=target_variance,
        d_value=d_value,
        topk=topk,
        heads=heads,
        dim=dim,
        score_mean=score_mean,
    )
    second_moment = score_mean**2 * (1.0 + sigma_s**2)
    return math.sqrt(target_variance * dim / (LINEAR_GAIN * second_moment * topk * heads * d_value))


def on_meta_device(module: torch.nn.Module) -> bool:
    """True when ``module``'s parameters live on the meta device (shapes only, for counting): nothing
    there to initialise or calibrate, so the layers skip their initialisation."""
    return any(p.is_meta for p in module.parameters())


@torch.no_grad()
def estimate_score_moments(retrieval, n_tokens: int = 4096, seed: int = 0) -> tuple[float, float]:
    """Monte Carlo (mean, sigma_s) of the per-core top-m scores of ``retrieval`` on N(0, I) inputs.

    ``retrieval`` maps (T, h) -> (scores (T, m', c), slots); sigma_s is the relative spread,
    sqrt(E[s^2] / E[s]^2 - 1), so it does not depend on the overall score scale.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    param = next(retrieval.parameters())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, retrieval.dim, generator=gen).to(device=param.device, dtype=param.dtype)
    scores, _ = retrieval(x)
    scores = scores.double()
    mean = float(scores.mean())
    if not mean > 0:
        raise RuntimeError(f"mean top-m score is {mean:.4g} <= 0: the retrieval cannot be calibrated")
    spread = float((scores**2).mean()) / mean**2 - 1.0
    return mean, math.sqrt(max(spread, 0.0))  # spread >= 0 up to rounding (Jensen)


__all__ = [
    "LINEAR_GAIN",
    "GPT2_STD",
    "linear_std",
    "paper_ffn_variance",
    "swiglu_output_variance",
    "ffn_output_variance",
    "memory_output_variance",
    "principled_value_std",
    "printed_value_std",
    "plain_value_std",
    "estimate_score_moments",
    "on_meta_device",
]
