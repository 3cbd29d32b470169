"""UltraMemV2 [UM2]: forward vs a loop reference, gradcheck, ring sharing, MCP, errors, training."""

from pathlib import Path

import pytest
import torch
from test_ultramem import loop_tucker, train_and_check  # the TDQKR loop reference is shared with UltraMem
from torch.utils.flop_counter import FlopCounterMode

from minimem.accounting import ffn_flops_per_token, mcp_percent, memory_flops_per_token
from minimem.config import config_from_dict, load_config
from minimem.model import GPT
from minimem.ultramemv2 import UltraMemV2
from minimem_tools.experiments.ultramemv2_ablation import UltraMemV2Ablation

ABLATION = "ultramemv2-ablation"  # the experiments' kind with the switches of changes 2 and 3 (registered on import)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(n_layer=2, **memory):
    mem = dict(
        kind="ultramemv2", n_slots=16, topk=3, d_key=8, d_value=8, d_pre=4, cores=2, rank=2, heads=2, softmax=False
    )
    mem.update(memory)
    return config_from_dict(
        {"model": {"n_layer": n_layer, "n_embd": 16, "n_head": 2, "block_size": 8, "ffn_hidden": 24, "memory": mem}}
    ).model


ACT = {"none": lambda g: g, "gelu": torch.nn.functional.gelu, "relu": torch.relu}


def loop_ultramemv2(layer, x, row_of=None):
    """o = W^T sum_i s_i act(<P_i, W_p x>) V_i per core slice, token by token; rows on the ring window.

    Plain-values ablation: the gate is 1. E value projections (IVE ablation): virtual slot v is
    block v // rows, row v % rows, and slot i's read goes into block e's D_v-wide part of W's input.
    ``row_of``: slot -> table row, given by hand (the share_ratio test); by default the layer's window.
    """
    B, T, h = x.shape
    c, Dv, E = layer.n_cores, layer.d_value, getattr(layer, "projections", 1)
    width = Dv // c
    act = ACT[getattr(layer, "activation", "none")]
    out = torch.zeros(B, T, h, dtype=x.dtype)
    rows_read = []
    for b in range(B):
        for t in range(T):
            px = layer.pre_proj.weight @ x[b, t] if layer.pre_values is not None else None
            read = torch.zeros(E * Dv, dtype=x.dtype)
            token_rows = []
            for scores, slot in loop_tucker(layer.retrieval, x[b, t].tolist()):
                virtual = int(layer.shuffle[slot])
                block, row = divmod(virtual, layer.table_rows)
                row = (row + layer.offset) % layer.table_rows if row_of is None else row_of(slot)
                token_rows.append(row)
                gate = act(torch.dot(layer.pre_values[row], px)) if px is not None else 1.0
                for k in range(c):
                    read[block * Dv + k * width : block * Dv + (k + 1) * width] += (
                        scores[k] * gate * layer.values[row, k * width : (k + 1) * width]
                    )
            out[b, t] = layer.out_proj.weight @ read
            rows_read.append(sorted(token_rows))
    return out, rows_read


@pytest.mark.parametrize(
    "heads,ablation",
    [
        (2, {}),  # the paper's layer
        (1, {}),
        (1, {"kind": ABLATION, "activation": "gelu"}),  # the gate activation the paper dropped
        (2, {"kind": ABLATION, "pre_values": False}),  # change 3 undone: plain values
        (1, {"kind": ABLATION, "value_projections": 4}),  # change 2 undone: UltraMem's E per-block projections
        (2, {"kind": ABLATION, "activation": "gelu", "value_projections": 4, "ring_group": 4, "n_slots": 4, "topk": 2}),
    ],
)
def test_forward_matches_loop_reference(heads, ablation):
    torch.manual_seed(0)
    config = tiny_config(n_layer=2 + 2 * ("ring_group" in ablation), heads=heads, **ablation)
    layer = (UltraMemV2Ablation if "kind" in ablation else UltraMemV2)(config, 1).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    ref, rows = loop_ultramemv2(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    assert [sorted(r) for r in layer.last_indices.view(-1, heads * layer.topk).tolist()] == rows


def test_gradcheck_float64():
    torch.manual_seed(1)
    switches = ({}, {"activation": "relu"}, {"pre_values": False, "value_projections": 4})
    for ablation in switches:
        config = tiny_config(**ablation, **({"kind": ABLATION} if ablation else {}))
        layer = (UltraMemV2Ablation if ablation else UltraMemV2)(config, 0).double()
        names = [n for n, _ in layer.named_parameters()]
        expected = {
            "value_table.values",
            "out_proj.weight",
            "retrieval.cores",
            "retrieval.keys",
            "retrieval.query.weight",
        }
        assert expected <= set(names)
        assert ({"value_table.pre_values", "pre_proj.weight"} <= set(names)) == ("pre_values" not in ablation)
        params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
        x = torch.randn(1, 3, 16, dtype=torch.float64, requires_grad=True)

        def f(x, *ps, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def test_value_parameters_are_marked_and_refreshed_by_the_trainer_hook():
    model = GPT(tiny_config())
    marked = {n for n, p in model.named_parameters() if getattr(p, "is_memory_value", False)}
    assert marked == {f"blocks.{i}.memory.value_table.{t}" for i in range(2) for t in ("values", "pre_values")}
    mem = model.blocks[1].memory
    with torch.no_grad():
        mem.retrieval.cores.copy_(torch.randn_like(mem.retrieval.cores))
    stale = mem.retrieval.u.clone()
    mem(torch.randn(1, 2, 16))
    assert torch.equal(mem.retrieval.u, stale)  # the forward does not refresh
    model.after_optimizer_step()
    for head in range(2):
        U, _, _ = torch.linalg.svd(mem.retrieval.cores[head].sum(0).detach())
        torch.testing.assert_close(mem.retrieval.u[head].abs(), U[:, 0].abs())


def test_usage_counts():
    layer = UltraMemV2(tiny_config(), 0)
    layer(torch.randn(3, 4, 16))
    assert torch.equal(layer.usage_counts, torch.bincount(layer.last_indices.flatten(), minlength=16))
    assert int(layer.usage_counts.sum()) == 3 * 4 * 2 * 3
    layer.reset_usage()
    assert int(layer.usage_counts.sum()) == 0


# --------------------------------------------------------------------------- ring sharing


def test_ring_sharing_shares_one_parameter():
    model = GPT(tiny_config(n_layer=5, ring_group=4))  # groups [0, 1, 2, 3] (table 64 rows) and [4] (16 rows)
    mems = [block.memory for block in model.blocks]
    for k, mem in enumerate(mems[:4]):
        assert mem.values is mems[0].values and mem.pre_values is mems[0].pre_values
        assert mem.values.data_ptr() == mems[0].values.data_ptr()
        assert mem.table_rows == 64 and mem.offset == 16 * k and mem.retrieval.n_keys == 8
    assert mems[4].values is not mems[0].values and mems[4].table_rows == 16 and mems[4].offset == 0
    # counted once by parameters(), the optimiser and the state_dict
    names = [n for n, p in model.named_parameters() if p is mems[0].values]
    assert names == ["blocks.0.memory.value_table.values"]
    assert sum(1 for k in model.state_dict() if k.endswith("value_table.values")) == 2
    tables = sum(p.numel() for n, p in model.named_parameters() if "value_table" in n)
    assert tables == 5 * 16 * (8 + 4)  # the same value budget (N rows per layer) as unshared tables
    # an update through layer 2's output reaches the table layer 0 reads
    mems[2](torch.randn(1, 3, 16)).sum().backward()
    assert mems[0].values.grad is not None and mems[0].values.grad.abs().sum() > 0
    # a second model from the same config gets its own tables
    again = GPT(model.config)
    assert again.blocks[1].memory.values is again.blocks[0].memory.values
    assert again.blocks[0].memory.values is not mems[0].values


def test_ring_window_starts_at_the_layer_offset_and_wraps():
    torch.manual_seed(2)
    model = GPT(tiny_config(n_layer=4, ring_group=4, heads=1)).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    for mem in (model.blocks[k].memory for k in range(4)):
        with torch.no_grad():
            out = mem(x)
        ref, rows = loop_ultramemv2(mem, x)  # row = (shuffle[slot] + k N) mod G N
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
        assert [sorted(r) for r in mem.last_indices.view(-1, 3).tolist()] == rows
    # the layers' windows are rotations of the ring: same slot, rows k N apart (shuffle aside)
    shuffles = [model.blocks[k].memory.shuffle for k in range(4)]
    assert all(torch.equal(torch.sort(s).values, torch.arange(64)) for s in shuffles)
    assert not torch.equal(shuffles[0], shuffles[1])


def test_share_ratio_sliding_window_against_a_loop_reference():
    """share_ratio s: one table of L N / s rows; layer l reads rows (l N / s + shuffle[slot]) mod (L N / s)."""
    L, N, s = 4, 16, 2
    torch.manual_seed(3)
    model = GPT(tiny_config(n_layer=L, share_ratio=s, heads=1)).double()
    mems = [block.memory for block in model.blocks]
    R = L * N // s
    assert all(mem.values is mems[0].values for mem in mems) and mems[0].values.shape == (R, 8)
    assert [n for n, p in model.named_parameters() if p is mems[0].values] == ["blocks.0.memory.value_table.values"]
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    grads = []
    for l, mem in enumerate(mems):
        assert mem.retrieval.n_keys == 4 and mem.shuffle.numel() == N  # the layer's own N-slot key grid
        window = [(l * N // s + k) % R for k in range(N)]  # by hand: N rows from l N / s, wrapping
        out = mem(x)
        ref, rows = loop_ultramemv2(mem, x, row_of=lambda slot, mem=mem, window=window: window[int(mem.shuffle[slot])])
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
        assert [sorted(r) for r in mem.last_indices.view(-1, 3).tolist()] == rows
        mems[0].values.grad = None
        out.pow(2).sum().backward()
        grad_rows = set(mems[0].values.grad.abs().sum(1).nonzero().flatten().tolist())
        assert grad_rows == {r for token in rows for r in token} and grad_rows <= set(window)
        grads.append(grad_rows)
    # each row lies in s = 2 windows: rows read by two layers get gradients from both
    assert grads[0] & grads[1] and grads[3] & grads[0]  # layer 3's window wraps to rows 0 .. 7
    assert not grads[0] & grads[2]  # windows l N / s apart by N rows: disjoint


def test_ring_group_of_all_layers_is_share_ratio_l_with_l_n_slots():
    """The one case where ring_group's disjoint groups agree with share_ratio: all L layers share one table."""
    L, N = 4, 16
    x = torch.randn(2, 3, 16)
    models = []
    for memory in (dict(ring_group=L, n_slots=N), dict(share_ratio=L, n_slots=L * N)):
        torch.manual_seed(0)
        models.append(GPT(tiny_config(n_layer=L, **memory)))
    ring, share = models
    assert ring.state_dict().keys() == share.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ring.state_dict().values(), share.state_dict().values()))
    for a, b in zip(ring.blocks, share.blocks):
        assert (a.memory.table_rows, a.memory.offset) == (b.memory.table_rows, b.memory.offset)
        torch.testing.assert_close(a.memory(x), b.memory(x), rtol=0, atol=0)
    # with the same N per layer they differ: ring_group L addresses L N rows, share_ratio L only N of N rows
    assert GPT(tiny_config(n_layer=L, share_ratio=L)).blocks[0].memory.table_rows == N


def test_share_ratio_counts_and_errors():
    from minimem.accounting import count_parameters

    L, N, s, Dv, Dp = 4, 16, 2, 8, 4
    plain, shared = (count_parameters(tiny_config(n_layer=L, share_ratio=r)) for r in (0, s))
    assert plain["total"] - shared["total"] == (L * N - L * N // s) * (Dv + Dp)  # one table of L N / s rows
    assert plain["activated"] == shared["activated"]  # a token still reads H m rows in each layer
    built = GPT(tiny_config(n_layer=L, share_ratio=s))
    assert count_parameters(built) == shared and shared["total"] == sum(p.numel() for p in built.parameters())
    message = (
        r"model.memory.share_ratio=3 must divide the memory layers L=4 and n_slots=16, with model.memory.ring_group 1"
    )
    with pytest.raises(ValueError, match=message):
        tiny_config(n_layer=L, share_ratio=3)
    with pytest.raises(ValueError, match=r"model.memory.share_ratio=2 .*ring_group 1 \(got 4\)"):
        tiny_config(n_layer=L, share_ratio=2, ring_group=4)
    with pytest.raises(ValueError, match=r"model.memory.share_ratio=2 .*one value block \(got 4\)"):
        tiny_config(n_layer=L, share_ratio=2, kind=ABLATION, value_projections=4)
    with pytest.raises(ValueError, match=r"model.memory.share_ratio must be >= 0, got -1"):
        tiny_config(share_ratio=-1)


def test_ring_group_needs_a_square_table():
    with pytest.raises(
        ValueError, match="addresses 32 slots, which must be a perfect square: use model.memory.ring_group"
    ):
        GPT(tiny_config(n_layer=2, ring_group=2))


# --------------------------------------------------------------------------- widths, compute, errors


def test_default_widths_follow_the_paper():
    cfg = config_from_dict({"model": {"memory": {"kind": "ultramemv2", "n_slots": 1024}}}).model
    layer = UltraMemV2(cfg, 0)
    assert layer.d_key == 64 and layer.retrieval.half == 32  # D_k = h/2, split in two halves
    assert layer.d_value == 128 and layer.d_pre == 42  # D_v = h, D_p = D_v / 3


def test_flops_match_a_flop_counter_and_mcp():
    cfg = load_config(ROOT / "configs" / "shakespeare-ultramemv2.yaml").model
    model = GPT(cfg)
    x = torch.randn(2, 32, cfg.n_embd)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.blocks[0].memory(x)
    memory = sum(memory_flops_per_token(cfg, 0).values())
    assert memory == pytest.approx(counter.get_total_flops() / 64, rel=0.05)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.blocks[0].ffn(x)
    ffn = ffn_flops_per_token(cfg)
    assert ffn == counter.get_total_flops() / 64
    assert mcp_percent(cfg) == pytest.approx(100 * memory / (memory + ffn))
    wider = load_config(ROOT / "configs" / "shakespeare-ultramemv2.yaml", ["model.memory.d_key=128"]).model
    assert mcp_percent(wider) > mcp_percent(cfg)
    with pytest.raises(ValueError, match="mcp_percent needs a memory layer: model.memory.kind is 'none'"):
        mcp_percent(config_from_dict({}).model)


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="d_value=12 must be divisible by model.memory.cores=5"):
        tiny_config(d_value=12, cores=5)
    with pytest.raises(ValueError, match=r"model.memory.topk \(m\) must be in \[1, n=4\]"):
        tiny_config(topk=5)
    with pytest.raises(ValueError, match=r"model.memory.activation is not a field of kind 'ultramemv2' \(its fields"):
        tiny_config(activation="gelu")  # the gate activation is an ablation switch, not the paper's layer
    with pytest.raises(ValueError, match="model.memory.activation must be one of"):
        tiny_config(kind=ABLATION, activation="tanh")
    with pytest.raises(ValueError, match="model.memory.value_init must be one of"):
        tiny_config(value_init="xavier")
    with pytest.raises(ValueError, match="layer 1 is not a memory layer"):
        UltraMemV2(tiny_config(layers=[0]), 1)
    with pytest.raises(ValueError, match=r"model.memory.value_projections must be a perfect square >= 1 \(1, 4, 9"):
        tiny_config(kind=ABLATION, value_projections=2)
    with pytest.raises(ValueError, match=r"model.memory.pre_values must be a boolean \(true/false\), got 'maybe'"):
        tiny_config(kind=ABLATION, pre_values="maybe")
    with pytest.raises(ValueError, match="model.memory.activation gates the pre-values: it needs"):
        tiny_config(kind=ABLATION, activation="gelu", pre_values=False)


@pytest.mark.parametrize("ablation", [{"pre_values": False}, {"value_projections": 4}])
def test_ablation_switches_keep_accounting_exact(ablation):
    """Counted parameters and FLOPs of the ablated layer equal the formulas of ``minimem.accounting``."""
    from minimem.accounting import analytic_parameters, count_parameters

    cfg = load_config(
        ROOT / "configs" / "shakespeare-ultramemv2.yaml",
        [f"model.memory.kind={ABLATION}"] + [f"model.memory.{k}={str(v).lower()}" for k, v in ablation.items()],
    ).model
    model = GPT(cfg)
    assert count_parameters(model)["total"] == analytic_parameters(cfg)["total"]
    x = torch.randn(2, 32, cfg.n_embd)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.blocks[0].memory(x)
    assert sum(memory_flops_per_token(cfg, 0).values()) == pytest.approx(counter.get_total_flops() / 64, rel=0.05)


# --------------------------------------------------------------------------- config and training


def activated_parameters(model):
    """All parameters, minus the tables, plus the m (D_v + D_p) entries a token reads per head and layer."""
    total = model.num_parameters()
    tables = {id(b.memory.table): b.memory.table for b in model.blocks}
    total -= sum(p.numel() for t in tables.values() for p in t.parameters())
    for block in model.blocks:
        mem = block.memory
        total += mem.heads * mem.topk * (mem.d_value + mem.d_pre)
    return total


def test_config_matches_dense_activated_parameters():
    cfg = load_config(ROOT / "configs" / "shakespeare-ultramemv2.yaml")
    dense = GPT(config_from_dict({}).model)
    model = GPT(cfg.model)
    assert cfg.model.memory.kind == "ultramemv2" and not cfg.model.memory.softmax
    assert abs(activated_parameters(model) - dense.num_parameters()) / dense.num_parameters() < 0.002
    assert model.num_parameters() > 1.2 * dense.num_parameters()


def test_trains_on_shakespeare():
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "shakespeare-ultramemv2.yaml")
    train_and_check(GPT(cfg.model))
