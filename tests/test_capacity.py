"""minimem_tools.experiments.capacity: bits stored against hand-made models and a per-fact loop,
equal activated parameters for every variant, and the quick run end to end through the CLI."""

import json
import math

import torch

from minimem.config import config_from_dict
from minimem.data import get_dataset
from minimem.model import GPT
from minimem_tools.experiments import capacity, main
from minimem_tools.experiments.runner import EXPERIMENTS
from minimem_tools.experiments.setups import parameters

FACTS = dict(n_facts=20, key_len=3, value_len=4, key_vocab=26, value_vocab=10)


def facts(block_size=35):  # 4 items of 9 tokens: the last value ends inside x
    return get_dataset("facts", block_size, 0, **FACTS)


class Oracle(torch.nn.Module):
    """Names the next token with certainty (it reads x one step ahead: a hand-made perfect model)."""

    def forward(self, x):
        B, T = x.shape
        nxt = torch.cat([x[:, 1:], x[:, :1]], dim=1)  # (B, T): x[t + 1], the target of every value position
        return torch.nn.functional.one_hot(nxt, 66).float() * 1e4, None


class UniformValues(torch.nn.Module):
    """Uniform over the 10 digits, no mass anywhere else: CE = log2(10) bits per value token."""

    def forward(self, x):
        from minimem.data import _VALUE0

        logits = torch.full(x.shape + (66,), -1e9)
        logits[..., _VALUE0 : _VALUE0 + 10] = 0.0
        return logits, None


def test_bits_stored_hand_made_models():
    ds = facts()
    per_fact = capacity.bits_per_fact(4, 10)
    assert per_fact == 4 * math.log2(10)
    ce, exact = capacity.fact_scores(Oracle(), ds)
    assert ce.shape == (20,) and torch.allclose(ce, torch.zeros(20, dtype=ce.dtype), atol=1e-9)
    assert exact.all()
    assert capacity.bits_stored(ce, per_fact) == 20 * per_fact
    ce, exact = capacity.fact_scores(UniformValues(), ds)
    assert torch.allclose(ce, torch.full((20,), per_fact, dtype=ce.dtype))
    assert capacity.bits_stored(ce, per_fact) == 0.0
    # worse than uniform counts as nothing, per fact (not as negative bits)
    mixed = torch.tensor([0.0, 2 * per_fact, per_fact - 1.0], dtype=torch.float64)
    assert capacity.bits_stored(mixed, per_fact) == per_fact + 1.0


def test_fact_scores_match_a_per_fact_loop_on_a_random_model():
    ds = facts()
    model = GPT(config_from_dict({"model": dict(vocab_size=66, block_size=35, n_layer=1, n_embd=32)}).model).eval()
    ce, exact = capacity.fact_scores(model, ds, batch_size=2)  # batches split the rows
    scored = ds.evaluate(model)
    assert exact.float().mean().item() == scored["exact_match"]
    k = ds.items_per_seq
    for i in range(ds.n_facts):  # fact i: row i // k, item i % k of the evaluation packing
        row = [j % ds.n_facts for j in range((i // k) * k, (i // k + 1) * k)]
        x, y = ds._finish(ds._rows(torch.tensor([row])))
        logits = model(x)[0][0].double()
        bits = 0.0
        for p in ds.answer_positions[i % k].tolist():
            bits -= torch.log_softmax(logits[p], -1)[y[0, p]].item() / math.log(2)
        assert math.isclose(ce[i].item(), bits, rel_tol=1e-9)


def test_every_variant_at_the_dense_activated_parameters_and_sizes_swept():
    variants = capacity.variants(quick=False)
    by_model = {}
    for v in variants:
        by_model.setdefault(v.labels["model"], []).append(v)
    assert set(by_model) == set(capacity.MODELS) and len(by_model["dense"]) == 1
    reference = parameters(by_model["dense"][0].config)["activated"]
    for model, group in by_model.items():
        counts = [parameters(v.config) for v in group]
        for v, c in zip(group, counts):
            assert abs(c["activated"] / reference - 1) < 0.02, (v.name, c["activated"], reference)
        if model != "dense":
            assert len(group) >= 3
            totals = [c["total"] for c in counts]
            assert totals == sorted(totals) and totals[-1] > 2 * totals[0]  # the memory's total size grows


def test_quick_run_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, "capacity", "minimem_tools.experiments.capacity")
    assert main(["capacity", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    for suffix in ("json", "md", "png", "svg"):
        assert (tmp_path / f"capacity.{suffix}").stat().st_size > 0
    data = json.loads((tmp_path / "capacity.json").read_text())
    assert len(data["runs"]) == len(capacity.variants(quick=True))
    for run in data["runs"]:
        m = run["metrics"]
        per_fact = 4 * math.log2(10)
        assert m["facts_memorised"] == round(m["exact_match"] * m["n_facts"])
        assert 0 <= m["bits_stored"] <= m["n_facts"] * per_fact
        assert math.isclose(m["bits_per_param"], m["bits_stored"] / m["params_total"])
        assert "plateau_delta" in m
    md = (tmp_path / "capacity.md").read_text()
    assert "| dense |" in md and "bits_per_param" in md
