"""Inference: the KV cache, minimem.generate, ``minimem generate`` and ``minimem bench decode``.

- the cached forward gives the full forward's logits at every step (float64), for dense, MoE and
  every memory kind, for chunked prefills too;
- ``generate`` prefills, decodes one token at a time, and past ``block_size`` recomputes the cropped
  window: every step's logits equal ``model(idx[:, -block_size:])``;
- temperature 0 and top_k = 1 are greedy; top_k keeps exactly k tokens; bad arguments are ValueErrors;
- ``minimem generate`` on a tiny run trained for two steps, and its one-line errors;
- ``minimem bench decode --quick``: the table's shape, and the weight bytes counted by hand.
"""

from __future__ import annotations

import re

import pytest
import torch

from minimem.config import config_from_dict
from minimem.generate import generate, next_token_probabilities
from minimem.model import GPT, KVCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BASE = dict(vocab_size=13, block_size=12, n_layer=3, n_head=2, n_embd=16, ffn_hidden=24)
TUCKER = {"n_slots": 64, "topk": 4, "d_key": 8, "softmax": False}  # UltraMem and UltraMemV2 alike
KINDS = {
    "dense": {},
    "moe": {"ffn": "moe", "moe": {"n_experts": 4, "top_k": 2, "d_expert": 8}},
    "pkm": {"memory": {"kind": "pkm", "n_slots": 64, "heads": 2, "topk": 4, "d_key": 8}},
    "pkm-batchnorm": {"memory": {"kind": "pkm", "n_slots": 64, "topk": 4, "d_key": 8, "query_norm": "batchnorm"}},
    "peer": {"memory": {"kind": "peer", "n_slots": 64, "heads": 2, "topk": 4, "d_key": 8, "activation": "gelu"}},
    "ultramem": {"memory": TUCKER | {"kind": "ultramem", "skip": [[0, 2], [1, 2]], "d_value": 8, "expansion": 4}},
    "ultramemv2": {"memory": TUCKER | {"kind": "ultramemv2", "d_value": 12, "d_pre": 4}},
}


def model_of(kind: str, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = config_from_dict({"model": {**BASE, **KINDS[kind], **overrides}}).model
    return GPT(config).double().eval()


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_equal_the_full_forward_at_every_step(kind):
    model = model_of(kind)
    seq = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.config, 2, torch.float64)
    chunks = [(0, 3), (3, 5)] + [(t, t + 1) for t in range(5, 12)]  # a prefill, a chunk (masked), single tokens
    with torch.no_grad():
        for start, end in chunks:
            cached, _ = model(seq[:, start:end], cache=cache)
            full, _ = model(seq[:, :end])
            torch.testing.assert_close(cached, full[:, start:], rtol=0, atol=1e-10)
            assert cache.length == end


def test_the_cache_refuses_a_full_window_and_another_batch_size():
    model = model_of("dense")
    cache = KVCache(model.config, 2, torch.float64)
    model(torch.zeros(2, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"10 cached \+ 3 new positions exceeds model.block_size=12"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch size 2, got idx of batch size 1"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_matches_the_cropped_full_forward_before_and_past_block_size(kind):
    model = model_of(kind)
    calls = []  # (T of the forward's input, last-position logits) of each forward generate runs
    hook = model.register_forward_hook(lambda m, args, out: calls.append((args[0].shape[1], out[0][:, -1])))
    prompt = torch.randint(0, 13, (2, 4), generator=torch.Generator().manual_seed(2))
    out = generate(model, prompt, 14, generator=torch.Generator().manual_seed(3))
    hook.remove()
    assert out.shape == (2, 18) and torch.equal(out[:, :4], prompt)
    # prefill 4; one token at a time while the cache has room (contexts 5..12); then windows of 12
    assert [t for t, _ in calls] == [4] + [1] * 8 + [12] * 5
    with torch.no_grad():
        for step, (_, logits) in enumerate(calls):
            full, _ = model(out[:, : 4 + step][:, -12:])
            torch.testing.assert_close(logits, full[:, -1], rtol=0, atol=1e-10)


def test_a_prompt_longer_than_block_size_is_cropped():
    model = model_of("dense")
    prompt = torch.randint(0, 13, (1, 20), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, 3, temperature=0)
    expected = prompt
    for _ in range(3):
        expected = torch.cat((expected, model(expected[:, -12:])[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- sampling


def test_temperature_zero_and_top_k_one_are_greedy():
    model = model_of("moe")
    prompt = torch.randint(0, 13, (3, 2), generator=torch.Generator().manual_seed(5))
    greedy = prompt
    with torch.no_grad():
        for _ in range(15):
            greedy = torch.cat((greedy, model(greedy[:, -12:])[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(generate(model, prompt, 15, temperature=0), greedy)
    assert torch.equal(generate(model, prompt, 15, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    cold = generate(model, prompt, 15, temperature=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)  # temperature -> 0: sampling becomes the argmax


def test_top_k_keeps_exactly_the_k_largest_logits():
    logits = torch.randn(4, 13, generator=torch.Generator().manual_seed(6))
    for k in (1, 3, 13, 50):
        probs = next_token_probabilities(logits, temperature=0.7, top_k=k)
        kept = min(k, 13)
        assert ((probs > 0).sum(-1) == kept).all()
        top = logits.topk(kept, dim=-1).indices
        assert (probs.gather(-1, top) > 0).all()
        torch.testing.assert_close(probs.gather(-1, top), torch.softmax(logits.gather(-1, top) / 0.7, -1))
    ties = next_token_probabilities(torch.zeros(2, 13), top_k=4)  # all equal: still exactly 4
    assert ((ties > 0).sum(-1) == 4).all() and torch.allclose(ties.sum(-1), torch.ones(2))
    greedy = torch.nn.functional.one_hot(logits.argmax(-1), 13).float()
    torch.testing.assert_close(next_token_probabilities(logits, temperature=0), greedy)


def test_sampling_is_reproducible_and_keeps_the_mode():
    model = model_of("pkm-batchnorm")
    model.train()
    prompt = torch.zeros(2, 1, dtype=torch.long)
    a = generate(model, prompt, 10, top_k=5, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 10, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and model.training  # eval while sampling, then back to training
    assert torch.equal(generate(model, prompt, 0), prompt)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(idx=torch.zeros(3, dtype=torch.long)), "idx must be a \\(B, T\\) int64 tensor"),
        (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "T >= 1"),
        (dict(idx=torch.zeros(1, 2)), "int64"),
        (dict(idx=[[1, 2]]), "got list"),
        (dict(idx=torch.full((1, 2), 13)), "outside \\[0, model.vocab_size=13\\)"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(temperature="1"), "temperature"),
        (dict(top_k=0), "top_k must be None or an integer >= 1"),
        (dict(top_k=2.0), "top_k"),
        (dict(generator=1), "generator must be a torch.Generator"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, message):
    args = dict(model=model_of("dense"), idx=torch.zeros(1, 2, dtype=torch.long), max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(**args)


# ----------------------------------------------------------------------------- minimem generate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny shakespeare run trained for two steps, with a checkpoint."""
    from minimem.config import Config, ModelConfig, TrainConfig
    from minimem.train import train

    out = tmp_path_factory.mktemp("generate") / "run"
    model = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, ffn_hidden=16)
    steps = dict(max_steps=2, eval_interval=2, eval_iters=1, ckpt_interval=2, log_interval=1)
    config = Config(model=model, train=TrainConfig(batch_size=2, threads=1, out_dir=str(out), **steps))
    train(config, progress=False)
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    from minimem_tools import cli as entry

    try:
        rc = entry.main(["generate", *map(str, argv)])
    except SystemExit as exit:  # argparse's own errors
        rc = exit.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_generate_prints_the_prompt_and_its_continuation(run_dir, capsys):
    rc, out, err = cli(capsys, "--run", run_dir, "--prompt", "ROMEO:", "--tokens", 30, "--seed", 1)
    assert rc == 0 and err == ""
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 30 + 1  # one line break from print
    assert cli(capsys, "--run", run_dir, "--prompt", "ROMEO:", "--tokens", 30, "--seed", 1)[1] == out
    greedy = [cli(capsys, "--run", run_dir, "--temperature", 0, "--seed", s, "--tokens", 20)[1] for s in (1, 2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("\n")  # default prompt: a newline
    rc, out, _ = cli(capsys, "--run", run_dir, "--top-k", 1, "--tokens", 20)
    assert rc == 0 and out == greedy[0]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--run", "{tmp}/nowhere"], "--run {tmp}/nowhere: no such folder"),
        (["--run", "{tmp}/empty"], "--run {tmp}/empty holds no checkpoint (no checkpoint.json); train it first"),
        (["--run", "{run}", "--prompt", "café"], "--prompt holds 'é', not in the vocabulary of dataset 'shakespeare'"),
        (["--run", "{run}", "--prompt", ""], "--prompt must not be empty"),
        (["--run", "{run}", "--tokens", "-1"], "--tokens must be >= 0, got -1"),
        (["--run", "{run}", "--tokens", "many"], "argument --tokens: invalid int value: 'many'"),
        (["--run", "{run}", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--run", "{run}", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--run", "{run}", "--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["--run", "{run}", "--seed", "-3"], "--seed must be in [0, 2^63), got -3"),
        (["--prompt", "x"], "the following arguments are required: --run"),
    ],
)
def test_generate_bad_inputs_are_one_line_errors(run_dir, tmp_path, capsys, argv, fragment):
    (tmp_path / "empty").mkdir()
    fill = dict(tmp=tmp_path, run=run_dir)
    rc, out, err = cli(capsys, *[a.format(**fill) for a in argv])
    assert rc == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minimem generate: error: ") and "Traceback" not in err
    assert fragment.format(**fill) in lines[0]


def test_generate_reports_a_damaged_checkpoint_in_one_line(run_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    next(broken.glob("ckpt-*/model.safetensors")).write_bytes(b"not weights")
    rc, _, err = cli(capsys, "--run", broken)
    assert rc == 2 and len(err.splitlines()) == 1 and "corrupt checkpoint file" in err


# ----------------------------------------------------------------------------- minimem bench decode


def test_touched_bytes_counts_a_moe_step_by_hand():
    from minimem_tools.bench.decode import touched_bytes

    config = {"vocab_size": 5, "block_size": 4, "n_layer": 1, "n_head": 2, "n_embd": 8}
    config |= {"ffn": "moe", "moe": {"n_experts": 4, "top_k": 1, "d_expert": 2}}
    model = GPT(config_from_dict({"model": config}).model).eval()
    tokens = torch.tensor([[1], [1], [3]])
    model(tokens)
    model.blocks[0].ffn.last_indices = torch.tensor([[0], [2], [0]])  # experts 0 and 2
    # tied embedding 5*8 + attention 8*24 + 8*8 + norms 3*8 + router 8*4 = 352; one expert 8*4 + 2*8 = 48
    assert touched_bytes(model, tokens) == 4 * (352 + 2 * 48)


def test_touched_bytes_counts_rows_and_an_untied_input_table_by_hand():
    from minimem_tools.bench.decode import touched_bytes

    memory = {"kind": "pkm", "n_slots": 16, "heads": 1, "topk": 2, "d_key": 4, "query_norm": "none"}
    config = {"vocab_size": 5, "block_size": 4, "n_layer": 1, "n_head": 2, "n_embd": 8, "tie_embeddings": False}
    model = GPT(config_from_dict({"model": config | {"memory": memory}}).model).eval()
    tokens = torch.tensor([[1], [1], [3]])  # 2 distinct rows of the input table
    model(tokens)
    model.blocks[0].ffn.last_indices = torch.tensor([[0, 5], [5, 7], [0, 9]])  # 4 distinct value rows
    # head 5*8 + 2 input rows 2*8 + attention 256 + norms 24 + W_q 8*4 + sub-keys 2*4*2 = 384; rows 4*8
    assert touched_bytes(model, tokens) == 4 * (384 + 4 * 8)


def test_touched_bytes_counts_a_ring_shared_table_once():
    from minimem.accounting import count_parameters
    from minimem_tools.bench.decode import touched_bytes

    memory = {"kind": "ultramemv2", "n_slots": 16, "topk": 2, "d_key": 8, "d_value": 6, "d_pre": 2, "ring_group": 4}
    config = {"vocab_size": 5, "block_size": 4, "n_layer": 4, "n_head": 2, "n_embd": 8, "ffn_hidden": 8}
    model = GPT(config_from_dict({"model": config | {"memory": memory}}).model).eval()
    tokens = torch.tensor([[1], [2]])
    model(tokens)
    layers = [block.memory for block in model.blocks]
    assert len({id(m.table) for m in layers}) == 1  # one table of 4 x 16 rows for the four layers
    table = 64 * (6 + 2)
    for m in layers:
        m.last_indices = torch.tensor([[0], [0]])
    base = touched_bytes(model, tokens)
    assert base == 4 * (count_parameters(model)["total"] - table + 8)  # everything but the table, and row 0
    for i, m in enumerate(layers):  # rows {0,1}, {1,2}, {2,3}, {3,0}: 4 distinct rows, not 8
        m.last_indices = torch.tensor([[i], [(i + 1) % 4]])
    assert touched_bytes(model, tokens) - base == 4 * 3 * 8


def test_bench_decode_quick_prints_the_table(capsys):
    from minimem_tools.bench import main

    assert main(["decode", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"(dense|moe-8|ultramemv2) ", line)]
    assert [(r[0], int(r[3])) for r in rows] == [(m, b) for b in (1, 8, 64) for m in ("dense", "moe-8", "ultramemv2")]
    totals = {r[0]: int(r[1].replace(",", "")) for r in rows}
    assert max(totals.values()) / min(totals.values()) < 1.01  # equal total parameters
    for model, _, activated, batch, _, speed_ratio, kb, bytes_ratio in rows:
        activated, batch, kb = int(activated.replace(",", "")), int(batch), float(kb)
        if model == "dense":
            assert float(speed_ratio) == float(bytes_ratio) == 1.0
            assert kb == pytest.approx(4 * activated / batch / 1e3, abs=0.06)  # every weight, shared by B tokens
        if batch == 1:  # one token reads exactly its activated parameters
            assert kb == pytest.approx(4 * activated / 1e3, abs=0.06)
    big = {r[0]: float(r[7]) for r in rows if r[3] == "64"}
    assert big["ultramemv2"] < big["moe-8"] <= 1.0  # at batch 64 the MoE reads (nearly) every expert


def test_bench_decode_bad_inputs(capsys):
    from minimem_tools.bench import main

    for argv, fragment in (
        (["--tokens", "60"], "--prompt 16 + --tokens 60 must be <= the models' block_size 64"),
        (["--batch", "0"], "--batch sizes must all be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ):
        with pytest.raises(SystemExit) as exit:
            main(["decode", *argv])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith("minimem bench decode: error: ") and fragment in err
        assert len(err.splitlines()) == 1
