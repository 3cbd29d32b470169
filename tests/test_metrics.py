"""Memory usage metrics [PKM]: hand-computed cases and the per-layer report on a small GPT."""

import math

import pytest
import torch

from minimem.config import ModelConfig, PKMConfig
from minimem.metrics import (
    kl_from_uniform,
    memory_usage_report,
    named_memory_modules,
    slot_counts,
    usage_fraction,
    usage_metrics,
)
from minimem.model import GPT


def test_hand_computed_unweighted_case():
    indices = torch.tensor([[0, 1], [0, 2]])  # slot 0 twice, 1 and 2 once, 3 never (N = 4)
    z = slot_counts(indices, 4)
    assert z.tolist() == [2.0, 1.0, 1.0, 0.0]
    assert usage_fraction(z) == 0.75
    # p = (1/2, 1/4, 1/4, 0): log 4 + 1/2 log 1/2 + 2 * 1/4 log 1/4 = 1/2 log 2
    assert kl_from_uniform(z) == pytest.approx(0.5 * math.log(2))


def test_hand_computed_weighted_case():
    indices = torch.tensor([[0, 1], [2, 1]])
    weights = torch.tensor([[0.75, 0.25], [0.0, 1.0]])  # slot 2 selected but with zero weight
    z = slot_counts(indices, 3, weights)
    assert z.tolist() == [0.75, 1.25, 0.0]
    metrics = usage_metrics(indices, 3, weights)
    assert metrics["usage"] == pytest.approx(2 / 3)  # non-zero weight: slots 0 and 1
    p = [0.375, 0.625]
    assert metrics["kl_weighted"] == pytest.approx(math.log(3) + sum(x * math.log(x) for x in p))
    assert metrics["kl_unweighted"] == pytest.approx(math.log(3) + 0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))


def test_extremes_uniform_and_collapsed():
    assert kl_from_uniform(torch.ones(16)) == pytest.approx(0.0, abs=1e-12)
    collapsed = torch.zeros(16)
    collapsed[3] = 7
    assert kl_from_uniform(collapsed) == pytest.approx(math.log(16))
    assert usage_fraction(collapsed) == 1 / 16


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n_slots=4\)"):
        slot_counts(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="indices must have dtype torch.int64"):
        slot_counts(torch.tensor([[0, 1]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="weights must have the shape of indices"):
        slot_counts(torch.tensor([[0, 1]]), 4, torch.ones(2))
    with pytest.raises(ValueError, match="weights must be non-negative"):
        slot_counts(torch.tensor([[0, 1]]), 4, torch.tensor([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="n_slots must be a positive integer"):
        slot_counts(torch.tensor([[0]]), 0)
    with pytest.raises(ValueError, match="z must have a positive sum"):
        kl_from_uniform(torch.zeros(4))
    with pytest.raises(ValueError, match="z must be a non-empty 1-D tensor"):
        usage_fraction(torch.ones(2, 2))


def test_report_per_memory_layer_matches_manual_accumulation():
    config = ModelConfig(
        n_layer=3,
        n_embd=16,
        n_head=2,
        block_size=8,
        memory=PKMConfig(n_slots=64, heads=2, topk=4, layers=[0, 2]),
    )
    torch.manual_seed(0)
    model = GPT(config).train()
    assert sorted(named_memory_modules(model)) == ["blocks.0.ffn", "blocks.2.ffn"]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 65, (3, 8), generator=g) for _ in range(4)]
    report = memory_usage_report(model, [(b, b) for b in batches], max_batches=3)
    assert model.training  # mode restored
    assert model.blocks[0].ffn.usage_counts.sum() == 0  # evaluated in eval mode: no usage counted
    for name in ("blocks.0.ffn", "blocks.2.ffn"):
        layer = dict(model.named_modules())[name]
        hits = torch.zeros(64, dtype=torch.float64)
        mass = torch.zeros(64, dtype=torch.float64)
        model.eval()
        with torch.no_grad():
            for b in batches[:3]:
                model(b)
                flat = layer.last_indices.flatten()
                hits.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64))
                mass.index_add_(0, layer.last_indices.flatten(), layer.last_weights.flatten().double())
        p_hits, p_mass = hits / hits.sum(), mass / mass.sum()
        expected_kl_u = math.log(64) + sum(float(p * math.log(p)) for p in p_hits if p > 0)
        expected_kl_w = math.log(64) + sum(float(p * math.log(p)) for p in p_mass if p > 0)
        entry = report[name]
        assert entry["n_slots"] == 64
        assert entry["usage"] == pytest.approx(float((mass > 0).float().mean()))
        assert entry["kl_unweighted"] == pytest.approx(expected_kl_u)
        assert entry["kl_weighted"] == pytest.approx(expected_kl_w)
        assert 0 < entry["kl_weighted"] < math.log(64)


def test_report_needs_a_memory_layer():
    model = GPT(ModelConfig(n_layer=1, n_embd=16, n_head=2, block_size=8))
    with pytest.raises(ValueError, match="model has no memory layer"):
        memory_usage_report(model, [torch.zeros(1, 4, dtype=torch.long)])
