"""minimem.optim and minimem.train: parameter groups, schedule, metrics, exact resume, NaN stop, DDP."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import minimem.data
import minimem.train
from minimem.checkpoint import latest_checkpoint, load_checkpoint, load_model
from minimem.config import Config, ModelConfig, MoEConfig, TrainConfig
from minimem.model import GPT
from minimem.optim import build_optimizer, learning_rate, param_groups, set_learning_rates, value_lr_multiplier
from minimem.train import SetupError, TrainingDiverged, train
from minimem_tools.train import main

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(tmp_path, name="run", ffn="dense", **train_kw) -> Config:
    model = ModelConfig(
        block_size=32,
        n_layer=2,
        n_head=2,
        n_embd=32,
        ffn_hidden=64,
        ffn=ffn,
        moe=MoEConfig(n_experts=4, top_k=2, d_expert=16),
    )
    train_kw = {
        "batch_size": 4,
        "max_steps": 16,
        "warmup_steps": 4,
        "lr": 3e-3,
        "eval_interval": 8,
        "eval_iters": 2,
        "ckpt_interval": 8,
        "log_interval": 1,
        "threads": 1,
        "out_dir": str(tmp_path / name),
        **train_kw,
    }
    return Config(model=model, train=TrainConfig(**train_kw))


def metrics(config: Config) -> list[dict]:
    return [json.loads(line) for line in (Path(config.train.out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> list[tuple]:
    return [(r["step"], r["train_loss"], r["grad_norm"], r.get("val_loss")) for r in records]


# ----------------------------------------------------------------------------- optimiser groups, schedule


def test_param_groups_split_decay_no_decay_and_memory_values():
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, ffn_hidden=12))
    values = model.blocks[1].ffn.w2.weight
    values.is_memory_value = True
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}
    assert set(groups) == {"decay", "no_decay", "memory_values"}
    ids = lambda name: {id(p) for p in groups[name]["params"]}
    assert ids("memory_values") == {id(values)}
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    norms = {id(m.weight) for m in model.modules() if type(m).__name__ == "RMSNorm"}
    assert ids("no_decay") == norms
    assert id(model.tok_emb.weight) in ids("decay")  # tied with lm_head: counted once
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    assert (
        groups["decay"]["weight_decay"],
        groups["no_decay"]["weight_decay"],
        groups["memory_values"]["weight_decay"],
    ) == (0.1, 0.0, 0.0)


def test_learning_rate_warmup_then_cosine_to_min_lr():
    tc = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert [learning_rate(s, tc) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert learning_rate(10, tc) == pytest.approx(1.0)
    assert learning_rate(60, tc) == pytest.approx(0.55)  # halfway through the cosine
    assert learning_rate(35, tc) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(110, tc) == pytest.approx(0.1) and learning_rate(500, tc) == pytest.approx(0.1)
    after = [learning_rate(s, tc) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert learning_rate(0, TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step"):
        learning_rate(-1, tc)


def test_value_lr_multiplier_constant_and_linear_decay():
    tc = TrainConfig(lr=1.0, min_lr=1.0, warmup_steps=0, max_steps=11, value_lr_mult=5.0)
    assert value_lr_multiplier(0, tc) == value_lr_multiplier(10, tc) == 5.0
    tc.value_lr_schedule = "linear_decay"
    assert [value_lr_multiplier(s, tc) for s in (0, 5, 10)] == pytest.approx([5.0, 3.0, 1.0])
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, ffn_hidden=12))
    model.blocks[0].ffn.w2.weight.is_memory_value = True
    opt = build_optimizer(model, tc)
    set_learning_rates(opt, 5, tc)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(
        {"decay": 1.0, "no_decay": 1.0, "memory_values": 3.0}
    )
    tc.value_lr_schedule = "cosine"
    with pytest.raises(ValueError, match="train.value_lr_schedule"):
        value_lr_multiplier(0, tc)


# ----------------------------------------------------------------------------- a run


def test_training_lowers_the_loss_and_writes_metrics_and_checkpoints(tmp_path):
    config = tiny(tmp_path, max_steps=24, log_interval=4, ckpt_interval=10)
    result = train(config, progress=False)
    records = metrics(config)
    assert [r["step"] for r in records] == [4, 8, 10, 12, 16, 20, 24]
    for r in records:
        assert {"step", "train_loss", "lr", "aux_loss", "tokens_per_s", "grad_norm"} <= set(r)
        assert r["aux_loss"] == 0.0 and r["tokens_per_s"] > 0
    assert [r["step"] for r in records if "val_loss" in r] == [8, 16, 24]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[2] < val[1] < val[0] < math.log(65) and val[2] < 3.6
    assert result.steps == 24 and result.val_loss == records[-1]["val_loss"]
    assert result.train_loss == records[-1]["train_loss"] and result.out_dir == Path(config.train.out_dir)
    assert load_checkpoint(result.out_dir).step == 24
    assert sorted(p.name for p in result.out_dir.glob("ckpt-*")) == ["ckpt-0000024"]
    idx = torch.randint(0, 65, (2, 32))
    torch.testing.assert_close(load_model(result.out_dir)(idx)[0], result.model.eval()(idx)[0], rtol=0, atol=0)


def test_moe_trains_with_its_balance_loss(tmp_path):
    config = tiny(tmp_path, ffn="moe", max_steps=16, eval_interval=8)
    train(config, progress=False)
    records = metrics(config)
    assert all(r["aux_loss"] > 0 for r in records)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[1] < val[0] < math.log(65) and val[1] < 3.7
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.4


# ----------------------------------------------------------------------------- exact resume


def test_resume_after_a_crash_replays_the_same_losses_bitwise(tmp_path, monkeypatch):
    straight = tiny(tmp_path, "straight")
    reference = train(straight, progress=False)

    crashed = tiny(tmp_path, "crashed")
    real_get_dataset = minimem.train.get_dataset

    def dying_dataset(*args, **kwargs):  # the process dies while sampling step 12's batch
        dataset = real_get_dataset(*args, **kwargs)
        calls, real = [0], dataset.get_batch

        def get_batch(split, batch_size, generator):
            calls[0] += split == "train"
            if calls[0] == 12:
                raise KeyboardInterrupt
            return real(split, batch_size, generator)

        dataset.get_batch = get_batch
        return dataset

    with monkeypatch.context() as m:
        m.setattr(minimem.train, "get_dataset", dying_dataset)
        with pytest.raises(KeyboardInterrupt):
            train(crashed, progress=False)
    assert load_checkpoint(crashed.train.out_dir).step == 8
    assert metrics(crashed)[-1]["step"] == 11  # logged past the checkpoint: resume must drop those lines
    resumed = train(crashed, resume=True, progress=False)

    assert losses(metrics(crashed)) == losses(metrics(straight))  # exact float equality
    assert resumed.steps == 16 and resumed.val_loss == reference.val_loss
    for a, b in zip(reference.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_stop_at_then_resume_equals_one_run(tmp_path):
    straight = tiny(tmp_path, "straight", ckpt_interval=100)
    train(straight, progress=False)
    split = tiny(tmp_path, "split", ckpt_interval=100)
    first = train(split, stop_at=5, progress=False)
    assert first.steps == 5 and load_checkpoint(split.train.out_dir).step == 5
    train(split, resume=True, progress=False)
    a, b = losses(metrics(straight)), losses(metrics(split))
    # the stop adds an evaluation at step 5; every other line is identical
    assert [r for r in b if r[0] != 5] == [r for r in a if r[0] != 5]
    assert [r[:3] for r in b if r[0] == 5] == [r[:3] for r in a if r[0] == 5]


def test_resume_needs_a_checkpoint_and_the_same_model(tmp_path):
    config = tiny(tmp_path, max_steps=4, eval_interval=4, ckpt_interval=4)
    with pytest.raises(SetupError, match="no checkpoint"):
        train(config, resume=True, progress=False)
    done = train(config, progress=False)
    again = train(config, resume=True, progress=False)  # nothing left to do: reports the run's numbers
    assert (again.steps, again.val_loss, again.train_loss) == (4, done.val_loss, done.train_loss)
    config.model.n_layer = 3
    with pytest.raises(SetupError, match=r"model config differs.*n_layer: 2 -> 3"):
        train(config, resume=True, progress=False)


# ----------------------------------------------------------------------------- divergence


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny(tmp_path, ckpt_interval=5)
    forward, calls = GPT.forward, [0]

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training:
            calls[0] += 1
            if calls[0] == 13:
                logits = logits * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan.* at step 13; .*last good checkpoint .*ckpt-0000010"):
        train(config, progress=False)
    assert load_checkpoint(config.train.out_dir).step == 10
    assert metrics(config)[-1]["step"] == 12


def test_huge_learning_rate_diverges_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(tmp_path).to_dict()))
    code = main(
        [
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "train.lr=1e30",
            "train.min_lr=0",
            "train.warmup_steps=0",
            "train.ckpt_interval=1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("minimem train: error:") and "at step" in err and "Traceback" not in err
    step = int(err.split("at step ")[1].split(";")[0])
    assert load_checkpoint(out).step == step - 1


# ----------------------------------------------------------------------------- vocabulary, batch split


def test_vocab_size_comes_from_the_dataset_unless_the_config_contradicts_it(tmp_path, capsys):
    config = tiny(tmp_path, dataset="recall", max_steps=2, eval_interval=2)
    config.model.block_size = 64
    result = train(config, progress=False)
    vocab = len(minimem.data.SYMBOLS)
    assert vocab != 65 and result.model.config.vocab_size == vocab
    assert f"model.vocab_size set to {vocab} from dataset 'recall'" in capsys.readouterr().out
    assert "exact_match" in metrics(config)[-1]
    config.model.vocab_size = 100
    with pytest.raises(SetupError, match=rf"model.vocab_size=100 .* {vocab} tokens"):
        train(config, progress=False)


def test_global_batch_must_split_evenly_over_processes(tmp_path):
    from minimem.train import Distributed, _train

    config = tiny(tmp_path, batch_size=5)
    with pytest.raises(SetupError, match=r"train.batch_size=5 .* divisible .* \(2\)"):
        _train(config, Distributed(rank=0, world_size=2), False, 16, False)


# ----------------------------------------------------------------------------- data parallel


@pytest.mark.slow  # two fresh interpreters importing torch
def test_ddp_two_processes_match_one_process(tmp_path):
    config = tiny(tmp_path, "single", max_steps=6, eval_interval=3, ckpt_interval=6)
    train(config, progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "minimem_tools",
            "train",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "ddp"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" parameters, shakespeare") == 1 and ", 2 processes" in proc.stdout  # rank 0 alone prints
    single = metrics(config)
    ddp = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 2, 3, 4, 5, 6]  # rank 0 alone wrote
    for a, b in zip(single, ddp):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    assert a["train_loss"] < single[0]["train_loss"] - 0.1  # it trained
    assert latest_checkpoint(tmp_path / "ddp").name == "ckpt-0000006"


# ----------------------------------------------------------------------------- minimem bench step's verdict


@pytest.mark.parametrize(
    "ratios, verdict",
    [
        ([1.10, 1.15, 1.20, 1.22], "PASS"),  # upper quartile 1.205
        ([1.25, 1.25], "PASS"),  # on the target counts as within it
        ([1.30, 1.35, 1.40, 1.60], "FAIL"),  # lower quartile 1.3375
        ([1.20, 1.24, 1.27, 1.30], "UNDECIDED"),  # quartiles 1.23-1.2775 straddle 1.25
        ([1.27, 1.20, 1.30, 1.24], "UNDECIDED"),  # the order of the rounds does not matter
    ],
)
def test_bench_step_verdict_reads_the_quartiles_of_the_paired_ratios(ratios, verdict):
    from minimem_tools.bench.step import step_verdict

    got, median, q1, q3 = step_verdict(ratios, 1.25)
    assert got == verdict
    assert median == pytest.approx(statistics.median(ratios))
    assert q1 <= median <= q3


def test_bench_step_verdict_needs_two_rounds():
    from minimem_tools.bench.step import step_verdict

    with pytest.raises(ValueError, match="at least 2 rounds"):
        step_verdict([1.1])


def test_bench_step_table_judges_the_paired_ratios_on_the_thread_count_s_clock(capsys):
    from minimem_tools.bench.step import print_table

    # a slow stretch of the machine doubles both models' times in rounds 2-3; paired, each round says
    # 1.2x on the CPU clock (one thread) and 2.4x on the wall clock (two threads)
    dense = [100.0, 200.0, 200.0, 100.0]
    um2 = [120.0, 240.0, 240.0, 120.0]
    rounds = {"dense": (dense, dense), "ultramemv2": ([u * 2 for u in um2], um2)}  # (wall, cpu)
    assert print_table(rounds, threads=1, counts={"dense": (1, 1), "ultramemv2": (1, 2)})
    out = capsys.readouterr().out
    assert "PASS: UltraMemV2 step = 1.20x dense (median of 4 rounds' paired ratios, quartiles 1.20-1.20; cpu" in out
    assert not print_table(rounds, threads=2, counts={"dense": (1, 1), "ultramemv2": (1, 2)})  # wall: 2.4x
    assert "FAIL: UltraMemV2 step = 2.40x dense" in capsys.readouterr().out
