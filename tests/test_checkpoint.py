"""minimem.checkpoint: round trip, random states, crash safety, corruption reports."""

import errno
import json
import os
import random

import numpy as np
import pytest
import torch

import minimem.checkpoint as ckpt
from minimem.checkpoint import (
    CheckpointError,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    restore,
    restore_rng,
    save_checkpoint,
)
from minimem.config import Config, ModelConfig, TrainConfig
from minimem.model import GPT
from minimem.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(**model) -> Config:
    base = dict(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8, ffn_hidden=12)
    return Config(model=ModelConfig(**{**base, **model}), train=TrainConfig())


def trained(config: Config, steps: int = 3):
    torch.manual_seed(0)
    model = GPT(config.model)
    opt = build_optimizer(model, config.train)
    for _ in range(steps):
        idx = torch.randint(0, 13, (2, 8))
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_round_trip_restores_weights_optimizer_and_ties(tmp_path):
    config = tiny_config()
    model, opt = trained(config)
    path = save_checkpoint(tmp_path, 3, model, opt, config)
    assert path == tmp_path / "ckpt-0000003" and latest_checkpoint(tmp_path) == path
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 3 and loaded.config == config

    fresh = GPT(config.model)
    fresh_opt = build_optimizer(fresh, config.train)
    restore(loaded, fresh, fresh_opt)
    assert fresh.lm_head.weight is fresh.tok_emb.weight  # still tied after loading
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    # both continue identically
    idx = torch.randint(0, 13, (2, 8))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        _, loss = m(idx, idx)
        o.zero_grad()
        loss.backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_random_states_round_trip():
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen), torch.rand(2), np.random.rand(2), random.random(), np.random.randn()  # noqa: B018
    state = json.loads(json.dumps(capture_rng(gen)))  # must survive JSON
    draw = lambda: (torch.rand(4, generator=gen), torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    first = draw()
    draw()
    restore_rng(state, gen)
    second = draw()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert np.array_equal(first[2], second[2]) and first[3] == second[3] and first[4] == second[4]


def test_load_model_rebuilds_the_trained_model(tmp_path):
    config = tiny_config()
    model, opt = trained(config)
    save_checkpoint(tmp_path, 3, model, opt, config)
    again = load_model(tmp_path)
    assert not again.training
    idx = torch.randint(0, 13, (2, 8))
    torch.testing.assert_close(again(idx)[0], model.eval()(idx)[0], rtol=0, atol=0)


def test_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config()
    model, opt = trained(config, 1)
    save_checkpoint(tmp_path, 1, model, opt, config)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    model, opt = trained(config, 2)

    def torch_save_dies(obj, path):  # half a file, then the process "dies"
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ckpt.torch, "save", torch_save_dies)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, 2, model, opt, config)
    assert [p.name for p in tmp_path.glob("ckpt-0000002.tmp-*")] == [f"ckpt-0000002.tmp-{os.getpid()}"]  # debris
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 1
    assert all(torch.equal(loaded.model_state[k], good[k]) for k in loaded.model_state)

    # crash after the folder rename, before the pointer moved
    with monkeypatch.context() as m:
        m.setattr(ckpt, "_write_atomic", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, 2, model, opt, config)
    assert (tmp_path / "ckpt-0000002").is_dir() and load_checkpoint(tmp_path).step == 1

    # the next save cleans up and moves the pointer
    save_checkpoint(tmp_path, 2, model, opt, config)
    assert load_checkpoint(tmp_path).step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "ckpt-0000002"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _flip_byte(p / "ckpt-0000003" / "model.safetensors"), r"model\.safetensors: SHA-256"),
        (lambda p: _flip_byte(p / "ckpt-0000003" / "optimizer.pt"), r"optimizer\.pt: SHA-256"),
        (lambda p: (p / "ckpt-0000003" / "state.json").write_text('{"step": 3, "rng"'), r"state\.json"),
        (lambda p: (p / "ckpt-0000003" / "config.json").unlink(), r"config\.json is missing"),
        (
            lambda p: (p / "ckpt-0000003" / "config.json").write_text('{"model": {"n_head": 3}}'),
            r"config\.json: SHA-256",
        ),
        (lambda p: (p / "checkpoint.json").write_text("{not json"), r"corrupt checkpoint pointer"),
        (
            lambda p: (p / "checkpoint.json").write_text('{"step": 9, "path": "ckpt-0000009"}'),
            r"ckpt-0000009.*does not exist",
        ),
    ],
    ids=["weights", "optimizer", "state", "missing-config", "bad-config", "pointer", "dangling-pointer"],
)
def test_damaged_checkpoints_are_reported(tmp_path, damage, message):
    config = tiny_config()
    model, opt = trained(config)
    save_checkpoint(tmp_path, 3, model, opt, config)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_unhashed_garbage_weights_are_reported(tmp_path):
    config = tiny_config()
    model, opt = trained(config)
    path = save_checkpoint(tmp_path, 3, model, opt, config)
    state = json.loads((path / "state.json").read_text())
    state.update(format_version=1, sha256={})  # version 1 allowed unhashed files: the loader still checks them
    (path / "state.json").write_text(json.dumps(state))
    (path / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(tmp_path)


def test_checkpoint_of_another_model_does_not_fit(tmp_path):
    config = tiny_config()
    model, opt = trained(config)
    save_checkpoint(tmp_path, 3, model, opt, config)
    other = GPT(tiny_config(n_embd=16).model)
    with pytest.raises(CheckpointError, match="does not fit"):
        restore(load_checkpoint(tmp_path), other)
    deeper = GPT(tiny_config(n_layer=2).model)
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.1"):
        restore(load_checkpoint(tmp_path), deeper)


def test_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path) is None


def _edit_state(key, change):
    def edit(p):
        path = p / "ckpt-0000003" / "state.json"
        state = json.loads(path.read_text())
        state[key] = change(state[key])
        path.write_text(json.dumps(state))

    return edit


def _edit_config(p):
    path = p / "ckpt-0000003" / "config.json"
    config = json.loads(path.read_text())
    config["train"]["lr"] *= 2  # a valid config, just not the run's
    path.write_text(json.dumps(config))


def _other_weights(p):
    from safetensors.torch import save_model

    config = tiny_config()
    model, _ = trained(config, steps=1)  # a valid weights file of the same shapes, other values
    save_model(model, str(p / "ckpt-0000003" / "model.safetensors"))


def _other_optimizer(p):
    _, opt = trained(tiny_config(), steps=1)
    torch.save(opt.state_dict(), p / "ckpt-0000003" / "optimizer.pt")


@pytest.mark.parametrize(
    "edit, message",
    [
        (_edit_state("step", lambda step: step - 1), r"state\.json: its step, random states or extra do not match"),
        (
            _edit_state("rng", lambda rng: {**rng, "python": [rng["python"][0], rng["python"][1][::-1], None]}),
            r"state\.json: its step, random states",
        ),
        (
            _edit_state("sha256", lambda h: {k: v for k, v in h.items() if k != "config.json"}),
            r"state\.json: it records no SHA-256 of config\.json",
        ),
        (_edit_config, r"config\.json: SHA-256 does not match state\.json"),
        (_other_weights, r"model\.safetensors: SHA-256 does not match"),
        (_other_optimizer, r"optimizer\.pt: SHA-256 does not match"),
    ],
    ids=["state-step", "state-rng", "unhashed-config", "config", "weights", "optimizer"],
)
def test_every_file_a_resume_reads_is_hashed(tmp_path, edit, message):
    """A valid but different file (not only a damaged one) is caught: a resume would start from the wrong state."""
    config = tiny_config()
    model, opt = trained(config)
    save_checkpoint(tmp_path, 3, model, opt, config)
    load_checkpoint(tmp_path)  # loads before the edit
    edit(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_format_version_1_still_loads_and_unknown_versions_are_named(tmp_path):
    config = tiny_config()
    model, opt = trained(config)
    path = save_checkpoint(tmp_path, 3, model, opt, config)
    state = json.loads((path / "state.json").read_text())
    assert state["format_version"] == ckpt.FORMAT_VERSION == 2
    # version 1 hashed only the binary files
    old = {
        **state,
        "format_version": 1,
        "sha256": {f: state["sha256"][f] for f in ("model.safetensors", "optimizer.pt")},
    }
    (path / "state.json").write_text(json.dumps(old))
    assert load_checkpoint(tmp_path).step == 3
    (path / "state.json").write_text(json.dumps({**state, "format_version": 7}))
    with pytest.raises(CheckpointError, match=r"format_version 7; this minimem reads 1 and 2"):
        load_checkpoint(tmp_path)


def test_a_full_disk_keeps_the_last_checkpoint_and_frees_the_partial_one(tmp_path, monkeypatch):
    config = tiny_config()
    model, opt = trained(config, 1)
    save_checkpoint(tmp_path, 1, model, opt, config)

    def disk_full(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError) as caught:
        save_checkpoint(tmp_path, 2, model, opt, config)
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "ckpt-0000001"]  # no partial folder
    assert load_checkpoint(tmp_path).step == 1
