"""minimem.accounting: parameter counts, FLOPs, bytes read; ``minimem bench accounting``."""

import importlib.util
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minimem import accounting
from minimem.accounting import (
    analytic_parameters,
    bytes_read,
    count_parameters,
    expected_distinct,
    flops_per_token,
    mcp_percent,
    measured_bytes_read,
    plot_bytes_per_token,
)
from minimem.config import MEMORY_CONFIGS as CONFIG_CLASSES
from minimem.config import ModelConfig, MoEConfig
from minimem.model import GPT
from minimem_tools.experiments.ultramemv2_ablation import UltraMemV2AblationConfig

ABLATION = UltraMemV2AblationConfig.kind  # importing the module registers the kind

SMALL = dict(vocab_size=65, block_size=32, n_layer=3, n_head=2, n_embd=64, ffn_hidden=96)
MEMORY = dict(n_slots=256, topk=4)  # n = 16 sub-keys per side

CONFIGS = {
    "dense": ModelConfig(**SMALL),
    "dense-untied": ModelConfig(**SMALL, tie_embeddings=False),
    "moe": ModelConfig(**SMALL, ffn="moe", moe=MoEConfig(n_experts=8, top_k=2, d_expert=16)),
    "moe-shared-untied": ModelConfig(
        **SMALL, ffn="moe", tie_embeddings=False, moe=MoEConfig(n_experts=6, top_k=3, d_expert=24, shared_expert=True)
    ),
}
# memory kinds: (module that must exist, kwargs of the kind's config class)
MEMORY_CONFIGS = {
    "pkm": ("minimem.pkm", dict(kind="pkm", **MEMORY)),
    "pkm-3heads-bn-dv": ("minimem.pkm", dict(kind="pkm", heads=3, d_value=48, query_norm="batchnorm", **MEMORY)),
    "peer": ("minimem.peer", dict(kind="peer", heads=2, layers=[0, 2], **MEMORY)),
    "peer-gelu": ("minimem.peer", dict(kind="peer", activation="gelu", query_norm="none", **MEMORY)),
    "ultramem": ("minimem.ultramem", dict(kind="ultramem", skip=[[0, 2]], **MEMORY)),
    "ultramem-e1-2heads": (
        "minimem.ultramem",
        dict(kind="ultramem", skip=[[0, 1], [1, 2]], expansion=1, heads=2, rank=3, cores=1, **MEMORY),
    ),
    "ultramemv2": ("minimem.ultramemv2", dict(kind="ultramemv2", d_value=24, d_pre=8, **MEMORY)),
    "ultramemv2-ring": (
        "minimem.ultramemv2",
        dict(kind="ultramemv2", n_slots=64, topk=4, ring_group=4, heads=2, model=dict(n_layer=5)),
    ),
    # share_ratio 2: one table of L N / 2 = 128 rows, each layer's 64-row window; and the retrieval options
    "ultramemv2-share": (
        "minimem.ultramemv2",
        dict(kind="ultramemv2", n_slots=64, topk=4, share_ratio=2, heads=2, qk_norm="rmsnorm", model=dict(n_layer=4)),
    ),
    "ultramemv2-exact": ("minimem.ultramemv2", dict(kind="ultramemv2", search="exact", **MEMORY)),
    "ultramem-candidates": ("minimem.ultramem", dict(kind="ultramem", skip=[[0, 2]], candidates=12, **MEMORY)),
    "ultramemv2-signed": ("minimem.ultramemv2", dict(kind="ultramemv2", search="signed", candidates=5, **MEMORY)),
    # the experiments' ablation kind: ring of 4 layers sharing one 4 x 64-row table; two heads; gated pre-values
    "ultramemv2-ablation-ring-gelu": (
        "minimem_tools.experiments.ultramemv2_ablation",
        dict(kind=ABLATION, n_slots=64, topk=4, ring_group=4, heads=2, activation="gelu", model=dict(n_layer=5)),
    ),
    # plain values (no P, no W_p) with E = 4 per-block projections
    "ultramemv2-ablation-plain-e4": (
        "minimem_tools.experiments.ultramemv2_ablation",
        dict(kind=ABLATION, d_value=24, pre_values=False, value_projections=4, **MEMORY),
    ),
}


def memory_config(name):
    module, kwargs = MEMORY_CONFIGS[name]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    model_kwargs = {**SMALL, **kwargs.get("model", {})}
    kwargs = {k: v for k, v in kwargs.items() if k != "model"}
    return ModelConfig(**model_kwargs, memory=CONFIG_CLASSES[kwargs["kind"]](**kwargs))


def any_config(name):
    return CONFIGS[name] if name in CONFIGS else memory_config(name)


_BUILT = {}


def built(name):
    """The GPT of config ``name``, built once per test session (UltraMemV2's init is slow)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = GPT(any_config(name))
    return _BUILT[name]


ALL = list(CONFIGS) + list(MEMORY_CONFIGS)


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", ALL)
def test_analytic_counts_equal_the_built_module(name):
    config = any_config(name)
    model = built(name)
    counted = count_parameters(model)
    assert counted["total"] == sum(p.numel() for p in model.parameters())  # tied weights once
    assert counted == count_parameters(config)  # meta-device build gives the same numbers
    analytic = analytic_parameters(config)
    assert analytic["total"] == counted["total"]
    assert {k: v for k, v in analytic["by_part"].items() if v} == {k: v for k, v in counted["by_part"].items() if v}


def test_tied_embedding_counted_once():
    tied, untied = count_parameters(CONFIGS["dense"]), count_parameters(CONFIGS["dense-untied"])
    V, h = SMALL["vocab_size"], SMALL["n_embd"]
    assert tied["by_part"]["embedding"] == V * h and untied["by_part"]["embedding"] == 2 * V * h
    assert tied["activated_by_part"]["embedding"] == V * h  # the head reads the whole matrix
    assert untied["activated_by_part"]["embedding"] == V * h + h  # + one input row


def _touched_by_one_token(model, token=5):
    """Parameter elements with a nonzero gradient after one token's forward (slow reference).

    Attention weights count whole: with a single key the softmax is constant, so W_q and W_k
    get (numerically near-) zero gradients although the forward reads them.
    """
    model.zero_grad(set_to_none=True)
    logits, _ = model(torch.tensor([[token]]))
    (logits * torch.randn_like(logits)).sum().backward()
    return sum(
        p.numel() if ".attn." in name else int((p.grad != 0).sum())
        for name, p in model.named_parameters()
        if p.grad is not None
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_activated_equals_parameters_one_token_touches(name):
    torch.manual_seed(0)
    config = CONFIGS[name]
    model = GPT(config)
    counted = count_parameters(model)
    for part in ("attention", "norm", "ffn"):
        assert counted["activated_by_part"][part] == counted["by_part"][part]
    if config.ffn == "moe":
        E, k, d, h = config.moe.n_experts, config.moe.top_k, config.moe.d_expert, config.n_embd
        assert counted["by_part"]["moe"] - counted["activated_by_part"]["moe"] == config.n_layer * (E - k) * 3 * h * d
    if not config.tie_embeddings:  # only the looked-up row of the input table gets a gradient
        assert counted["activated_by_part"]["embedding"] == config.vocab_size * config.n_embd + config.n_embd
    assert _touched_by_one_token(model) == counted["activated"]


def test_memory_activated_value_rows_match_gradient():
    config = memory_config("pkm")
    torch.manual_seed(0)
    model = GPT(config)
    counted = count_parameters(model)
    mem = model.blocks[config.n_layer // 2].ffn
    values = mem.values
    model.zero_grad(set_to_none=True)
    logits, _ = model(torch.tensor([[7]]))
    (logits * torch.randn_like(logits)).sum().backward()
    rows_with_grad = int((values.grad != 0).any(1).sum())
    m, H = config.memory.topk, config.memory.heads
    assert rows_with_grad == H * m
    non_values = counted["by_part"]["memory"] - values.numel()
    assert counted["activated_by_part"]["memory"] == non_values + rows_with_grad * values.shape[1]


# ----------------------------------------------------------------------------- FLOPs


def _matmul_lookup(values, indices, scores, pre_values=None, pre_input=None):
    """Specification §6 lookup written with batched matrix products, so FlopCounterMode sees its FLOPs.

    The package's eager lookup uses elementwise products / embedding_bag (faster on CPU), which
    the counter does not count; the FLOP formula is checked against this matmul form instead.
    """
    T, m = indices.shape
    c = scores.shape[-1]
    rows = values[indices].view(T, m, c, values.shape[1] // c)
    weights = scores
    if pre_values is not None:
        weights = weights * torch.bmm(pre_values[indices], pre_input.unsqueeze(-1))
    return torch.einsum("tik,tikd->tkd", weights, rows).reshape(T, values.shape[1])


def _counted_flops(model, idx):
    import minimem.kernels as kernels

    original = kernels.memory_lookup_torch
    kernels.memory_lookup_torch = _matmul_lookup
    try:
        with FlopCounterMode(display=False) as counter:
            model(idx)
    finally:
        kernels.memory_lookup_torch = original
    return counter


@pytest.mark.parametrize("name", ALL)
def test_flops_match_torch_flop_counter(name):
    """Matrix-product FLOPs of a real forward == the formula minus what the counter cannot see.

    The counter misses the causal attention products on CPU (checked separately below), the
    m^2 candidate-grid additions of product-key retrieval and elementwise lookups. TDQKR's small
    terms (rank-1 candidate scores, m x m grid, per-core scores: O(r n + r m^2) per head) are
    matmuls or elementwise products depending on the implementation, so for them the formula
    only has to lie between "counter saw none of them" and "counter saw all of them".
    """
    config = any_config(name)
    model = built(name).eval()
    idx = torch.randint(config.vocab_size, (2, config.block_size))
    counter = _counted_flops(model, idx)
    sdpa = sum(f for op, f in counter.get_flop_counts()["Global"].items() if "attention" in str(op))
    ours = flops_per_token(config, context=config.block_size)
    seen = (counter.get_total_flops() - sdpa) / idx.numel()
    expected = ours["forward"] - ours["attention_context"] - _unseen_by_counter(config)
    small = _tucker_small_terms(model)
    assert expected - small - 1e-6 <= seen <= expected + 1e-6
    if not small:
        assert seen == pytest.approx(expected, rel=1e-12)


def _tucker_small_terms(model):
    """Per token, over all TDQKR layers: 4 r n_keys + 2 (r^2 M + r M^2) + 2 c m (r^2 + r) per head (M x M grid)."""
    total = 0
    for mem in accounting.memory_modules(model):
        ret = getattr(mem, "retrieval", None)
        if ret is None:
            continue
        r, nk, m, c, H = ret.rank, ret.n_keys, ret.topk, ret.n_cores, ret.heads
        M = nk if ret.exact else (ret.candidates or m) * (2 if ret.signed else 1)  # the M x M grid
        total += H * (0 if ret.exact else 4 * r * nk) + H * (2 * (r * r * M + r * M * M) + 2 * c * m * (r * r + r))
    return total


def _unseen_by_counter(config):
    """Memory FLOPs done by additions / elementwise ops, which FlopCounterMode does not count."""
    mem, layers = config.memory, accounting.n_memory_layers(config)
    if mem.kind in ("pkm", "peer"):
        return layers * mem.heads * mem.topk**2  # the m x m candidate-grid sums
    if mem.kind != "none" and accounting.memory_dims(config)["E"] > 1:  # IVE pools one (token, slot) row at a time
        return layers * 2 * mem.heads * mem.topk * (mem.d_value or config.n_embd)
    return 0


def test_attention_context_flops_against_explicit_attention():
    """4 h c FLOPs per token per layer: QK^T and AV written out over c = T keys."""
    config = CONFIGS["dense"]
    T, h = 24, config.n_embd
    q = k = v = torch.randn(1, config.n_head, T, h // config.n_head)
    with FlopCounterMode(display=False) as counter:
        (q @ k.transpose(-1, -2)).softmax(-1) @ v
    per_token = counter.get_total_flops() / T
    assert flops_per_token(config, context=T)["attention_context"] == config.n_layer * per_token
    causal = flops_per_token(config)["attention_context"]
    assert causal == config.n_layer * 4 * h * (config.block_size + 1) / 2


@pytest.mark.parametrize("name", [n for n in ALL if n not in CONFIGS])
def test_mcp_percent_is_memory_share_of_ffn_plus_memory(name):
    config = any_config(name)
    f = flops_per_token(config)
    mcp = mcp_percent(config)
    assert 0 < mcp < 100
    assert mcp == pytest.approx(100 * f["memory"] / (f["memory"] + f["ffn"] + f["moe"]))
    # a wider memory (bigger D_k) takes a larger share
    wider = memory_config(name)
    wider.memory.d_key = 2 * (config.memory.d_key or config.n_embd // 2)
    assert mcp_percent(wider) > mcp


# ----------------------------------------------------------------------------- bytes read


@pytest.mark.parametrize("E,k", [(16, 3), (64, 8), (10, 1)])
def test_expected_distinct_matches_monte_carlo(E, k):
    g = torch.Generator().manual_seed(0)
    trials = 2000
    for B in (1, 3, 12, 40):
        picks = torch.rand(trials, B, E, generator=g).argsort(-1)[..., :k]  # k distinct per token
        hit = torch.zeros(trials, E, dtype=torch.bool)
        hit.scatter_(1, picks.reshape(trials, -1), True)
        distinct = hit.sum(1).double()
        se = distinct.std().item() / math.sqrt(trials)
        assert abs(distinct.mean().item() - expected_distinct(E, k, B)) < 4 * se + 1e-9


def test_bytes_monotone_in_batch_and_saturating():
    for name in ("dense", "moe", "moe-shared-untied"):
        config = CONFIGS[name]
        rows = [bytes_read(config, B) for B in (1, 2, 4, 16, 64, 256, 4096, 2**20)]
        expected = [r["expected"] for r in rows]
        per_token = [r["expected_per_token"] for r in rows]
        assert all(a <= b for a, b in zip(expected, expected[1:]))
        assert all(a > b for a, b in zip(per_token, per_token[1:]))
        assert all(r["expected"] <= r["bound"] + 1e-6 for r in rows)
        total_bytes = 4 * count_parameters(config)["total"]
        assert rows[-1]["expected"] == pytest.approx(total_bytes)  # every weight read once
        assert rows[-1]["bound"] == total_bytes
        if config.ffn == "moe":
            k = config.moe.top_k
            per_expert = 3 * config.n_embd * config.moe.d_expert
            assert rows[0]["moe_bound"] == rows[0]["moe_expected"] == config.n_layer * k * per_expert * 4
            assert bytes_read(config, 1, dtype_bytes=2)["expected"] == rows[0]["expected"] / 2
            assert rows[0]["expected"] < total_bytes


def test_bytes_dense_is_batch_independent():
    r1, r2 = bytes_read(CONFIGS["dense"], 1), bytes_read(CONFIGS["dense"], 999)
    assert r1["expected"] == r2["expected"] == 4 * count_parameters(CONFIGS["dense"])["total"]


def test_measured_distinct_experts_from_a_real_moe_forward():
    config = CONFIGS["moe"]
    torch.manual_seed(0)
    model = GPT(config)
    inputs = []
    hooks = [b.ffn.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach())) for b in model.blocks]
    for B, T in ((1, 1), (1, 3), (4, 32)):
        inputs.clear()
        idx = torch.randint(config.vocab_size, (B, T))
        measured = measured_bytes_read(model, idx)
        bound = bytes_read(config, B * T)
        # independent recount from the routers' inputs
        recount = []
        for block, x in zip(model.blocks, inputs):
            top = block.ffn.router(x.reshape(-1, config.n_embd)).topk(config.moe.top_k, dim=-1).indices
            recount.append(int(top.unique().numel()))
        assert measured["distinct_experts"] == recount
        assert all(e <= min(B * T * config.moe.top_k, config.moe.n_experts) for e in recount)
        assert measured["total"] <= bound["bound"]
        per_expert = 3 * config.n_embd * config.moe.d_expert * 4
        assert measured["moe"] == sum(recount) * per_expert
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("name", [n for n in ALL if n not in CONFIGS])
def test_measured_value_rows_within_bound(name):
    config = any_config(name)
    model = built(name)
    table_rows = [
        m.values.shape[0] if hasattr(m, "values") else m.up.shape[0] for m in accounting.memory_modules(model)
    ]
    assert all(rows % config.memory.n_slots == 0 for rows in table_rows)  # N, or G N for a ring of G layers
    for B, T in ((1, 1), (2, 16)):
        idx = torch.randint(config.vocab_size, (B, T))
        measured = measured_bytes_read(model, idx)
        bound = bytes_read(model, B * T)
        reads = config.memory.heads * config.memory.topk
        assert len(measured["distinct_rows"]) == accounting.n_memory_layers(config)
        assert all(1 <= r <= min(B * T * reads, rows) for r, rows in zip(measured["distinct_rows"], table_rows))
        assert measured["total"] <= bound["bound"] + 1e-6
        if B * T == 1 and config.memory.heads == 1:  # one token reads exactly m distinct rows
            assert measured["distinct_rows"] == [config.memory.topk] * len(measured["distinct_rows"])


def test_bytes_memory_bound_and_expectation():
    config = memory_config("pkm")
    N, m, Dv = config.memory.n_slots, config.memory.topk, config.n_embd
    for B in (1, 8, 64, 10_000):
        r = bytes_read(config, B)
        assert r["memory_bound"] == min(B * m, N) * Dv * 4
        assert r["memory_expected"] == pytest.approx(N * (1 - (1 - m / N) ** B) * Dv * 4)


# ----------------------------------------------------------------------------- errors, plot, bench


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="batch_tokens"):
        bytes_read(CONFIGS["dense"], 0)
    with pytest.raises(ValueError, match="dtype_bytes"):
        bytes_read(CONFIGS["dense"], 4, dtype_bytes=0)
    with pytest.raises(ValueError, match="ModelConfig"):
        count_parameters("dense")
    with pytest.raises(ValueError, match="memory.kind"):
        mcp_percent(CONFIGS["dense"])
    with pytest.raises(ValueError, match="context"):
        flops_per_token(CONFIGS["dense"], context=0)
    with pytest.raises(ValueError, match="per_token"):
        expected_distinct(4, 5, 1)
    with pytest.raises(ValueError, match="batch_sizes"):
        plot_bytes_per_token({"dense": CONFIGS["dense"]}, [0, 4])


def test_plot_bytes_per_token():
    fig = plot_bytes_per_token({"dense": CONFIGS["dense"], "moe": CONFIGS["moe"]}, [1, 8, 64, 512])
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert len(ax.lines) == 4  # expectation + bound per config
    dense_line = ax.lines[0]
    assert list(dense_line.get_xdata()) == [1, 8, 64, 512]
    assert dense_line.get_ydata()[0] == 4 * count_parameters(CONFIGS["dense"])["total"]


def test_bench_accounting_prints_table_and_saves_plot(tmp_path, capsys):
    from minimem_tools.bench.accounting import main

    (tmp_path / "dense.yaml").write_text("model:\n  n_layer: 2\n  n_embd: 64\n  n_head: 2\n")
    (tmp_path / "moe.yaml").write_text("model:\n  n_layer: 2\n  n_embd: 64\n  n_head: 2\n  ffn: moe\n")
    plot = tmp_path / "bytes.png"
    assert main(["--configs-dir", str(tmp_path), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "B/tok@4096" in out and "dense" in out and "moe" in out
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["--configs-dir", str(tmp_path / "missing")]) == 2
