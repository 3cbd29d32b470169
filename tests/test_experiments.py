"""minimem_tools.experiments: runner statistics, parameter matching, every experiment's variants,
one quick experiment end to end through the CLI (JSON schema, table, plots), and
reproducibility (same seed -> identical metrics, also across worker processes)."""

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minimem.config import config_from_dict
from minimem_tools.experiments import main, setups
from minimem_tools.experiments.runner import (
    EXPERIMENTS,
    is_timing_metric,
    load_experiment,
    markdown_table,
    mean_std,
    run_experiment,
    seeds_for,
    summarise,
)

NAMES = (
    "head2head",
    "density",
    "ablations",
    "ultramem_ablations",
    "init_stability",
    "memory_access",
    "in_context",
    "capacity",
    "converged",
    "retrieval",
)


# ----------------------------------------------------------------------------- statistics and tables


def test_mean_std_matches_numpy_and_skips_non_finite():
    xs = [1.5, 2.0, 4.25, -0.5]
    s = mean_std(xs)
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(np.mean(xs))
    assert s["std"] == pytest.approx(np.std(xs, ddof=1))
    s = mean_std([1.0, float("nan"), None, 3.0, float("inf")])
    assert s == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2}
    assert mean_std([7.0]) == {"mean": 7.0, "std": 0.0, "n": 1}
    assert mean_std([float("nan")]) == {"mean": None, "std": None, "n": 0}


def test_summarise_groups_runs_by_name_in_first_seen_order():
    runs = [
        {"name": "b", "metrics": {"loss": 1.0, "acc": 0.5}, "wall_time_s": 2.0},
        {"name": "a", "metrics": {"loss": 3.0}, "wall_time_s": 1.0},
        {"name": "b", "metrics": {"loss": 2.0, "acc": 0.7}, "wall_time_s": 4.0},
    ]
    summary = summarise(runs)
    assert [e["name"] for e in summary] == ["b", "a"]
    b = summary[0]
    assert b["loss"]["mean"] == pytest.approx(1.5) and b["loss"]["n"] == 2
    assert b["loss"]["std"] == pytest.approx(statistics.stdev([1.0, 2.0]))
    assert b["acc"]["mean"] == pytest.approx(0.6)
    assert b["wall_time_s"]["mean"] == pytest.approx(3.0)
    assert summary[1]["loss"] == {"mean": 3.0, "std": 0.0, "n": 1}
    assert "acc" not in summary[1]


def test_markdown_table_shows_mean_and_spread():
    result = {
        "summary": summarise(
            [
                {"name": "x", "metrics": {"loss": 1.0}, "wall_time_s": 0.0},
                {"name": "x", "metrics": {"loss": 2.0}, "wall_time_s": 0.0},
                {"name": "y", "metrics": {}, "wall_time_s": 0.0},
            ]
        )
    }
    table = markdown_table(result, [("loss", ".2f")]).splitlines()
    assert table[0] == "| run | loss | seeds |"
    assert table[2] == f"| x | 1.50 ± {statistics.stdev([1.0, 2.0]):.2f} | 2 |"
    assert table[3] == "| y | n/a | 1 |"


def test_timing_metrics_are_recognised():
    for name in ("train_tokens_per_s", "train_step_ms", "wall_time_s", "step_time_ratio"):
        assert is_timing_metric(name)
    for name in ("val_loss", "exact_match", "params_total", "diverged", "distinct_B16"):
        assert not is_timing_metric(name)


def test_bad_names_and_counts_raise_clear_errors(capsys):
    with pytest.raises(ValueError, match="experiment must be one of"):
        load_experiment("nope")
    with pytest.raises(ValueError, match="--seeds must be a positive integer"):
        seeds_for(0)
    with pytest.raises(ValueError, match="workers"):
        run_experiment("density", quick=True, workers=0)
    assert main(["nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert main(["density", "--seeds", "0"]) == 2
    assert "--seeds must be a positive integer" in capsys.readouterr().err
    assert main(["density", "--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert main([]) == 2


def test_list_names_every_experiment(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in NAMES + ("all",):
        assert name in out
    assert tuple(EXPERIMENTS) == NAMES


# ----------------------------------------------------------------------------- parameter matching


def test_match_parameters_finds_the_brute_force_optimum():
    base = setups.model_config("dense")
    target = 1_234_567
    fitted = setups.match_parameters(base, "model.ffn_hidden", target, "total", low=1, high=2000)
    # brute force: total is 800,000 + 4 * 3 * 128 * (f - 344); scan every f
    best = min(range(1, 2001), key=lambda f: abs(800_000 + 1536 * (f - 344) - target))
    assert fitted["model"]["ffn_hidden"] == best
    assert setups.parameters(fitted)["total"] == 800_000 + 1536 * (best - 344)
    squares = setups.match_parameters(
        setups.model_config("pkm"), "model.memory.n_slots", 3_000_000, "total", to_value=lambda k: k * k, low=8
    )
    n = math.isqrt(squares["model"]["memory"]["n_slots"])
    assert n * n == squares["model"]["memory"]["n_slots"]
    totals = {
        k: setups.parameters(setups.set_path(squares, "model.memory.n_slots", k * k))["total"]
        for k in (n - 1, n, n + 1)
    }
    assert abs(totals[n] - 3_000_000) <= min(abs(totals[n - 1] - 3_000_000), abs(totals[n + 1] - 3_000_000))
    with pytest.raises(ValueError, match="count must be 'total' or 'activated'"):
        setups.match_parameters(base, "model.ffn_hidden", target, "bogus")
    with pytest.raises(ValueError, match="unknown config field 'model.ffn_width'"):
        setups.set_path(base, "model.ffn_width", 3)
    with pytest.raises(ValueError, match="model must be one of"):
        setups.model_config("moe4")


def test_head2head_parities_hold():
    from minimem_tools.experiments import head2head

    configs = head2head.parity_configs()
    counts = {key: setups.parameters(c) for key, c in configs.items()}
    dense = counts[("dense", "active")]["activated"]
    anchor = counts[(head2head.ANCHOR, "active")]["total"]
    for (model, parity), c in counts.items():
        if parity == "active":
            assert abs(c["activated"] - dense) / dense < 0.035, (model, c)
        else:
            assert abs(c["total"] - anchor) / anchor < 0.01, (model, c)
            if model != "dense":  # sparse models keep (about) their activated parameters
                assert abs(c["activated"] - dense) / dense < 0.07, (model, c)
    moe8 = configs[("moe8", "active")]["model"]["moe"]
    assert (moe8["n_experts"], moe8["top_k"]) == (64, 8)


@pytest.mark.parametrize("name", NAMES)
def test_every_experiment_builds_valid_distinct_variants(name):
    module = load_experiment(name)
    quick, full = module.variants(True), module.variants(False)
    assert [v.name for v in quick] == [v.name for v in full]
    assert len({v.name for v in quick}) == len(quick) >= 2
    for q, f in zip(quick, full):
        for v in (q, f):
            assert config_from_dict(json.loads(json.dumps(v.config))).to_dict() == v.config  # complete and valid
            assert v.config["train"]["threads"] == 1
        assert q.config["model"] == f.config["model"]  # quick changes the schedule, not the model
        assert q.config["train"]["max_steps"] < f.config["train"]["max_steps"]
    assert module.TABLE and module.CLAIM and callable(module.plot) and callable(module.run)


def test_ablations_change_what_they_claim():
    from minimem_tools.experiments import ablations

    configs = {n: c for n, (_, c) in ablations.ablation_configs().items()}
    base = configs["baseline"]["model"]["memory"]
    assert configs["few_layers"]["model"]["memory"]["layers"] == [1, 3]
    assert configs["init_std0.02"]["model"]["memory"]["value_init"] == "std0.02"
    assert configs["gelu_gate"]["model"]["memory"]["activation"] == "gelu"
    assert configs["plain_values"]["model"]["memory"]["pre_values"] is False
    assert configs["per_block_projections"]["model"]["memory"]["value_projections"] == 4
    assert (
        configs["d_key_h/4"]["model"]["memory"]["d_key"] == 32 and configs["d_key_h"]["model"]["memory"]["d_key"] == 128
    )
    target = setups.parameters(configs["baseline"])["activated"]
    for name in ("few_layers", "d_key_h/4", "d_key_h", "two_heads", "plain_values", "per_block_projections"):
        assert abs(setups.parameters(configs[name])["activated"] - target) / target < 0.01, name
    switches = {"gelu_gate": "activation", "plain_values": "pre_values", "per_block_projections": "value_projections"}
    for name, c in configs.items():  # everything else equals the baseline
        diff = {k for k in base if c["model"]["memory"][k] != base[k]}
        assert diff <= {"layers", "n_slots", "value_init", "d_key", "heads", "topk", "kind"}, (name, diff)
        # only the variants that need a switch are of the experiments' ablation kind, with one switch moved
        mem = c["model"]["memory"]
        assert ("kind" in diff) == (name in switches), name
        if name in switches:
            assert mem["kind"] == "ultramemv2-ablation"
            moved = {
                k
                for k in ("activation", "pre_values", "value_projections")
                if mem[k] != dict(activation="none", pre_values=True, value_projections=1)[k]
            }
            assert moved == {switches[name]}, (name, moved)
    assert ablations.NOT_RUN == {}


def test_in_context_tasks_fill_the_context():
    from minimem.data import get_dataset
    from minimem_tools.experiments import in_context

    for task in in_context.TASKS:
        for context in in_context.CONTEXTS:
            ds = get_dataset(task, context, 0, **in_context.task_args(task, context))
            x, y = ds.get_batch("train", 2, __import__("torch").Generator().manual_seed(0))
            used = int((y != -1).nonzero()[:, 1].max()) + 1  # last answer position
            assert used > 0.75 * context, (task, context, used)
    with pytest.raises(ValueError, match="too short for the multiround task"):
        in_context.task_args("multiround", 16)


# ----------------------------------------------------------------------------- end to end


def _non_timing(result):
    return [
        (r["name"], r["seed"], {k: v for k, v in r["metrics"].items() if not is_timing_metric(k)})
        for r in result["runs"]
    ]


def test_quick_experiment_through_the_cli_writes_json_table_and_plots(tmp_path, capsys):
    assert main(["init_stability", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| principled/lr=normal |" in out
    data = json.loads((tmp_path / "init_stability.json").read_text())
    for key in ("experiment", "git_commit", "quick", "seeds", "created", "runs", "summary"):
        assert key in data
    assert data["experiment"] == "init_stability" and data["quick"] is True and data["seeds"] == [0]
    assert len(data["git_commit"]) == 40 or data["git_commit"] == "unknown"
    module = load_experiment("init_stability")
    assert [r["name"] for r in data["runs"]] == [v.name for v in module.variants(True)]
    for run in data["runs"]:
        assert set(run) >= {"name", "config", "seed", "metrics", "wall_time_s"}
        assert run["config"]["train"]["seed"] == run["seed"] == 0
        assert run["config"]["train"]["max_steps"] == module.QUICK["steps"]
        assert config_from_dict(run["config"])  # the full config, loadable
        assert run["wall_time_s"] > 0
        assert run["metrics"]["diverged"] in (0, 1)
    for entry, run in zip(data["summary"], data["runs"]):  # one seed: mean = the run's value, std 0
        assert entry["name"] == run["name"]
        if run["metrics"]["val_loss"] is not None:
            assert entry["val_loss"] == {"mean": run["metrics"]["val_loss"], "std": 0.0, "n": 1}
    principled = data["runs"][0]["metrics"]["init_value_std"]
    assert data["runs"][1]["metrics"]["init_value_std"] == pytest.approx(0.02)
    assert data["runs"][2]["metrics"]["init_value_std"] == pytest.approx(1.0)
    assert 0 < principled < 1
    md = (tmp_path / "init_stability.md").read_text()
    assert "| run | diverged | val_loss |" in md and "quick=True" in md
    for ext in ("png", "svg"):
        path = tmp_path / f"init_stability.{ext}"
        assert path.stat().st_size > 1000
    assert (tmp_path / "init_stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_reproduces_metrics_in_process_and_in_workers_and_another_seed_differs(tmp_path):
    first = run_experiment(
        "memory_access", quick=True, seeds=[0], out_dir=tmp_path / "a", progress=False, verbose=False
    )
    again = run_experiment(
        "memory_access", quick=True, seeds=[0], out_dir=tmp_path / "b", progress=False, verbose=False, workers=2
    )  # spawned processes, one thread each
    other = run_experiment(
        "memory_access", quick=True, seeds=[1], out_dir=tmp_path / "c", progress=False, verbose=False
    )
    assert again["workers"] == 2
    assert _non_timing(first) == _non_timing(again)
    a = {name: m for name, _, m in _non_timing(first)}
    c = {name: m for name, _, m in _non_timing(other)}
    assert all(a[n]["val_loss"] != c[n]["val_loss"] for n in a)
    for metrics in a.values():  # the measured access never exceeds the analytic bound
        for b in (1, 16):
            assert 1 <= metrics[f"distinct_B{b}"] <= metrics[f"bound_B{b}"] <= metrics[f"population_B{b}"]
    assert a["moe2"]["distinct_B1"] == 2 and a["moe8"]["distinct_B1"] == 8  # one token: exactly k experts
    assert a["ultramemv2"]["distinct_B1"] <= 16


def test_resume_keeps_finished_runs_and_runs_only_the_missing_ones(tmp_path, monkeypatch):
    first = run_experiment("init_stability", quick=True, seeds=[0], out_dir=tmp_path, progress=False, verbose=False)
    path = tmp_path / "init_stability.json"
    data = json.loads(path.read_text())
    data["runs"] = data["runs"][:4]  # as if interrupted after 4 runs
    data["runs"][0]["metrics"]["val_loss"] = 123.0  # marks a kept run
    path.write_text(json.dumps(data))
    module = load_experiment("init_stability")
    calls = []
    original = module.run
    monkeypatch.setattr(module, "run", lambda v, s, q: calls.append(v.name) or original(v, s, q))
    resumed = run_experiment(
        "init_stability", quick=True, seeds=[0], out_dir=tmp_path, progress=False, verbose=False, resume=True
    )
    assert calls == [r["name"] for r in first["runs"][4:]]
    assert resumed["resumed_runs"] == 4
    assert resumed["runs"][0]["metrics"]["val_loss"] == 123.0
    assert _non_timing(resumed)[1:] == _non_timing(first)[1:]


def test_results_already_in_out_are_kept_unless_overwrite_and_replaced_with_it(tmp_path):
    path = tmp_path / "memory_access.json"
    path.write_text('{"runs": []}\n')  # a stand-in for a finished experiment's results
    with pytest.raises(ValueError, match=r"memory_access\.json already holds results: pass --resume .* --overwrite"):
        run_experiment("memory_access", quick=True, seeds=[0], out_dir=tmp_path, progress=False, verbose=False)
    with pytest.raises(ValueError, match="pass only one"):
        run_experiment(
            "memory_access", quick=True, seeds=[0], out_dir=tmp_path, progress=False, verbose=False,
            resume=True, overwrite=True,
        )  # fmt: skip
    assert path.read_text() == '{"runs": []}\n' and [p.name for p in tmp_path.iterdir()] == [path.name]
    new = run_experiment(
        "memory_access", quick=True, seeds=[0], out_dir=tmp_path, progress=False, verbose=False, overwrite=True
    )
    assert json.loads(path.read_text())["runs"] == new["runs"] and len(new["runs"]) == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"runs": [{"name": "dense", "se', r"init_stability\.json is not valid JSON \(.* at line 1, column \d+\)"),
        ('{"runs": {"name": "dense"}}', r"init_stability\.json is not an experiment results file"),
    ],
)
def test_resume_refuses_a_torn_results_file_and_keeps_it(tmp_path, text, message):
    path = tmp_path / "init_stability.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        run_experiment(
            "init_stability", quick=True, seeds=[0], out_dir=tmp_path, progress=False, verbose=False, resume=True
        )
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["init_stability.json"]


def test_ultramem_ablations_remove_one_mechanism_each_at_equal_activated_parameters():
    from minimem_tools.experiments import ultramem_ablations

    configs = {n: c for n, (_, c) in ultramem_ablations.ablation_configs().items()}
    base = configs["baseline"]
    mem = {n: c["model"]["memory"] for n, c in configs.items()}
    assert mem["baseline"]["softmax"] is False and mem["softmax"]["softmax"] is True
    assert (mem["baseline"]["cores"], mem["one_core"]["cores"]) == (2, 1)
    assert (mem["baseline"]["expansion"], mem["no_ive"]["expansion"]) == (4, 1)
    assert (mem["baseline"]["rank"], mem["rank1"]["rank"]) == (2, 1)
    assert base["train"]["value_lr_mult"] == 4.0 and configs["value_lr_1x"]["train"]["value_lr_mult"] == 1.0
    target = setups.parameters(base)["activated"]
    for name, c in configs.items():
        assert abs(setups.parameters(c)["activated"] - target) / target < 0.01, name
        changed = {k for k in mem["baseline"] if mem[name][k] != mem["baseline"][k]}
        assert len(changed) <= 1, (name, changed)  # one mechanism at a time


def test_head2head_finalize_times_the_steps_and_writes_the_profile(tmp_path):
    from minimem_tools.experiments import head2head

    runs = [{"name": v.name, "labels": v.labels, "config": v.config} for v in head2head.variants(True)]
    result = {"runs": runs}
    head2head.finalize(result, tmp_path, quick=True)
    step = result["step_time"]
    assert step["wall_ratio_to_dense"]["dense"] == 1.0 and set(step["wall_ms"]) >= {"dense", "ultramemv2"}
    assert all(ms > 0 for ms in step["cpu_ms"].values())
    assert {"dense", "ultramemv2"} <= set(step["block0_fwd_bwd_ms"])
    infer = result["inference_tokens_per_s"]
    shakespeare = {r["name"] for r in runs if r["labels"]["task"] == "shakespeare"}
    assert set(infer) == shakespeare | {"what"} and all(infer[n]["mean"] > 0 for n in shakespeare)
    assert (
        head2head.speed(result, "ultramemv2", "total", "infer_tokens_per_s")[0]
        == infer[head2head.name_of("ultramemv2", "total", "shakespeare")]["mean"]
    )
    # training tokens/s from the interleaved step time: 12 x 64 tokens per step
    assert head2head.speed(result, "moe2", "active", "train_tokens_per_s")[0] == pytest.approx(
        768 / (step["wall_ms"]["moe"] / 1000)
    )
    profile = (tmp_path / "head2head_profile.txt").read_text()
    assert "## ultramemv2" in profile and "the largest differences" in profile  # ultramemv2 against dense


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table in /proc")
def test_sigterm_on_the_experiment_stops_its_workers(tmp_path):
    # `kill PID` (or a scheduler's SIGTERM) on `minimem experiment --jobs 2` used to leave its two spawned
    # workers training on as orphans; now the parent unwinds and the pool stops them.
    def children(pid):
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended while the table was read
                continue
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
        return found

    command = [sys.executable, "-m", "minimem_tools", "experiment", "capacity", "--quick", "--no-progress"]
    command += ["--jobs", "2"]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo}
    proc = subprocess.Popen(command + ["--out", str(tmp_path / "results")], cwd=tmp_path, env=env)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline:  # the pool's two workers (not its tracker)
            time.sleep(0.2)
            workers = [c for c in children(proc.pid) if b"spawn_main" in _cmdline(c)]
        assert len(workers) == 2, "the experiment never started its workers"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(_state(w) != "Z" for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [w for w in workers if _state(w) != "Z"]
        assert not alive, f"workers {alive} outlived the experiment"
    finally:  # a failing run must not leave them training
        proc.kill()
        for w in workers:
            if _state(w) != "Z":
                os.kill(w, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, ...); "Z" for a zombie or a process that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
