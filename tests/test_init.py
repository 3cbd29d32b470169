"""Principled initialisation of UltraMemV2 [UM2] App. A: formulas, Monte Carlo sigma_s, branch variances."""

import math
from pathlib import Path

import pytest
import torch

from minimem.config import config_from_dict, load_config
from minimem.init import (
    estimate_score_moments,
    ffn_output_variance,
    linear_std,
    memory_output_variance,
    paper_ffn_variance,
    plain_value_std,
    principled_value_std,
    printed_value_std,
    swiglu_output_variance,
)
from minimem.model import GPT, SwiGLU
from minimem.ultramemv2 import UltraMemV2
from minimem_tools.experiments.ultramemv2_ablation import UltraMemV2Ablation

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def unit_inputs(tokens, dim, seed=123):
    return torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed))


def v2_config(**memory):
    mem = dict(kind="ultramemv2", n_slots=1024, topk=16, d_key=64, d_value=48, d_pre=16, softmax=False)
    mem.update(memory)
    return config_from_dict({"model": {"ffn_hidden": 266, "memory": mem}}).model


# --------------------------------------------------------------------------- the FFN side


def test_swiglu_variance_matches_a_measured_swiglu():
    torch.manual_seed(0)
    ffn = SwiGLU(64, 512)
    torch.nn.init.normal_(ffn.w13.weight, 0.0, 0.1)
    torch.nn.init.normal_(ffn.w2.weight, 0.0, 0.03)
    with torch.no_grad():
        measured = ffn(unit_inputs(8192, 64)).var().item()
    assert measured == pytest.approx(swiglu_output_variance(64, 512, 0.1, 0.03), rel=0.1)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_ffn_output_variance_is_the_gpt_ffn_at_init(ffn):
    torch.manual_seed(1)
    cfg = config_from_dict(
        {
            "model": {
                "ffn": ffn,
                "n_layer": 3,
                "moe": {"n_experts": 8, "top_k": 2, "d_expert": 96, "shared_expert": True},
            }
        }
    ).model
    model = GPT(cfg)
    with torch.no_grad():
        measured = sum(block.ffn(unit_inputs(4096, 128)).var().item() for block in model.blocks) / 3
    assert measured == pytest.approx(ffn_output_variance(cfg), rel=0.12)


# --------------------------------------------------------------------------- the formulas


def test_formula_reduces_to_the_paper_closed_form():
    k_inner, L, h, m, H, sigma_s, d_pre, d_value = 2.75, 20, 768, 32, 1, 0.4, 192, 192
    target = paper_ffn_variance(k_inner, L)
    assert target == pytest.approx(0.064 * k_inner / (2 * L))
    sigma_v = principled_value_std(target, sigma_s, d_pre, d_value, m, H, h)
    closed = 0.2 * k_inner * h / (m * H * (1 + sigma_s**2) * d_pre * d_value * L)  # sigma_V^4, Specification §4.4
    assert sigma_v**4 == pytest.approx(closed, rel=1e-12)
    assert memory_output_variance(sigma_v, sigma_s, d_pre, d_value, m, H, h) == pytest.approx(target, rel=1e-12)
    assert printed_value_std(target, sigma_s, d_pre, d_value, m, H, h) ** 2 == pytest.approx(closed, rel=1e-12)
    assert linear_std(h) == pytest.approx(math.sqrt(2 / (5 * h)))


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="d_pre must be > 0, got 0"):
        principled_value_std(1e-3, 0.3, 0, 48, 16, 1, 128)
    with pytest.raises(ValueError, match="sigma_s must be >= 0"):
        principled_value_std(1e-3, -0.1, 16, 48, 16, 1, 128)
    with pytest.raises(ValueError, match="target_variance must be > 0"):
        printed_value_std(0.0, 0.3, 16, 48, 16, 1, 128)
    layer = UltraMemV2(v2_config(), 0)
    with pytest.raises(ValueError, match="n_tokens must be >= 1"):
        estimate_score_moments(layer.retrieval, 0)


# --------------------------------------------------------------------------- Monte Carlo sigma_s


def test_scores_are_calibrated_and_sigma_s_is_their_spread():
    layer = UltraMemV2(v2_config(), 2)
    with torch.no_grad():
        scores, _ = layer.retrieval(unit_inputs(4096, 128, seed=7))  # fresh inputs, not the Monte Carlo ones
    assert scores.shape[-1] == 2  # per-core scores
    assert scores.mean().item() == pytest.approx(1.0, abs=0.05)
    spread = (scores.std(unbiased=False) / scores.mean()).item()
    assert layer.sigma_s == pytest.approx(spread, rel=0.1)
    assert layer.score_mean == 1.0


def test_sigma_s_from_the_config_overrides_the_estimate():
    cfg = v2_config(sigma_s=0.7)
    layer = UltraMemV2(cfg, 0)
    assert layer.sigma_s == 0.7
    expected = principled_value_std(ffn_output_variance(cfg), 0.7, 16, 48, 16, 1, 128)
    assert layer.value_std == pytest.approx(expected)
    assert layer.values.std().item() == pytest.approx(expected, rel=0.02)
    assert layer.pre_values.std().item() == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("mode,std", [("std0.02", 0.02), ("naive", 1.0)])
def test_fixed_value_inits(mode, std):
    layer = UltraMemV2(v2_config(value_init=mode), 0)
    assert layer.values.std().item() == pytest.approx(std, rel=0.02)
    assert layer.pre_values.std().item() == pytest.approx(std, rel=0.03)


# --------------------------------------------------------------------------- sigma_V^4, settled numerically


@pytest.mark.parametrize("d_pre,d_value,topk,heads", [(16, 48, 16, 1), (32, 96, 8, 2), (8, 64, 24, 1)])
def test_fourth_root_matches_the_ffn_variance_and_the_printed_square_root_does_not(d_pre, d_value, topk, heads):
    torch.manual_seed(3)
    x = unit_inputs(4096, 128).view(1, 4096, 128)
    measured = {}
    for mode in ("principled", "paper"):
        cfg = v2_config(d_pre=d_pre, d_value=d_value, topk=topk, heads=heads, value_init=mode)
        layer = UltraMemV2(cfg, 1)
        with torch.no_grad():
            measured[mode] = layer(x).var().item()
        # the model of App. A predicts the measured variance from (sigma_V, sigma_s)
        predicted = memory_output_variance(layer.value_std, layer.sigma_s, d_pre, d_value, topk, heads, 128)
        assert measured[mode] == pytest.approx(predicted, rel=0.2)
    target = ffn_output_variance(cfg)
    assert measured["principled"] / target == pytest.approx(1.0, abs=0.2)  # sigma_V^4 = ...: variances match
    assert measured["paper"] / target < 1e-3  # sigma_V^2 = ... as printed: the branch starts silent


def test_gpt_memory_branch_matches_the_ffn_branch():
    """The property the init is derived for, on the course config: std(memory) within 20% of std(FFN)."""
    torch.manual_seed(4)
    model = GPT(load_config(ROOT / "configs" / "shakespeare-ultramemv2.yaml").model)
    x = unit_inputs(4096, 128).view(4, 1024, 128)  # unit-variance input to the memory, as the FFN sees it
    with torch.no_grad():
        for block in model.blocks:
            ratio = block.memory(x).std().item() / block.ffn(x).std().item()
            assert 0.8 < ratio < 1.2, ratio


@pytest.mark.parametrize("d_value,topk,heads", [(48, 16, 1), (96, 8, 2)])
def test_plain_values_ablation_matches_the_ffn_variance(d_value, topk, heads):
    """Without pre-values sigma_V enters once: sigma_V^2 = sigma_ffn^2 h / (0.4 (1 + sigma_s^2) m H D_v)."""
    torch.manual_seed(5)
    x = unit_inputs(4096, 128).view(1, 4096, 128)
    cfg = v2_config(kind="ultramemv2-ablation", d_value=d_value, topk=topk, heads=heads, pre_values=False)
    layer = UltraMemV2Ablation(cfg, 1)  # the experiments' plain-values variant
    assert layer.pre_values is None and layer.pre_proj is None
    assert layer.value_std == pytest.approx(
        plain_value_std(ffn_output_variance(cfg), layer.sigma_s, d_value, topk, heads, 128, layer.score_mean)
    )
    with torch.no_grad():
        measured = layer(x).var().item()
    assert measured / ffn_output_variance(cfg) == pytest.approx(1.0, abs=0.2)
    with pytest.raises(ValueError, match="d_value must be > 0"):
        plain_value_std(1.0, 0.5, 0, topk, heads, 128)
