"""A run folder is never lost: refuse to reuse it silently, --overwrite keeps the old run until the
new one's first checkpoint, one writer at a time, torn metrics, a full disk, a model too big for
memory, and ``--out`` paths that cannot be a run folder (each one stderr line, exit 2, nothing changed)."""

import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_train import REPO, losses, metrics, tiny  # the tiny run config and metric readers are shared

import minimem.checkpoint
import minimem.guards
import minimem.train
from minimem.checkpoint import load_checkpoint
from minimem.model import GPT
from minimem.train import SetupError, TrainingDiverged, estimate_memory, train
from minimem_tools.train import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder``: mode and content (the lock file's holder PID left out)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mode, None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.name != minimem.train.LOCK_FILE
    }


def failing_forward(at_call: int, failure: str):
    """GPT.forward that poisons (NaN) or raises at its ``at_call``-th training call."""
    forward, calls = GPT.forward, [0]

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training:
            calls[0] += 1
            if calls[0] == at_call:
                if failure == "raise":
                    raise RuntimeError("DefaultCPUAllocator: not enough memory")  # an out-of-memory at that step
                logits = logits * float("nan")
        return logits, loss

    return poisoned


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().err.splitlines()


def write_config(tmp_path: Path, **train_kw) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path, **train_kw).to_dict()))
    return path


# ----------------------------------------------------------------------------- reuse needs a flag


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    config = tiny(tmp_path, max_steps=4, eval_interval=4, ckpt_interval=4)
    train(config, progress=False)
    out = Path(config.train.out_dir)
    before = snapshot(out)
    with pytest.raises(SetupError, match=rf"--out {out} already holds a run: pass --resume .* or --overwrite"):
        train(config, progress=False)
    with pytest.raises(SetupError, match="pass only one"):
        train(config, resume=True, overwrite=True, progress=False)
    cfg = write_config(tmp_path, max_steps=4)
    code, err = run_cli(capsys, "--config", str(cfg), "--out", str(out), "--no-progress")
    assert code == 2 and len(err) == 1, err
    assert str(out) in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert snapshot(out) == before


@pytest.mark.parametrize("failure", ["nan", "raise"])
def test_an_overwrite_that_fails_before_its_first_checkpoint_leaves_the_old_run(tmp_path, monkeypatch, failure):
    old = tiny(tmp_path, max_steps=8, ckpt_interval=4)
    train(old, progress=False)
    out = Path(old.train.out_dir)
    before = snapshot(out)
    new = tiny(tmp_path, max_steps=8, ckpt_interval=4, lr=1e-3)
    with monkeypatch.context() as m:
        m.setattr(GPT, "forward", failing_forward(2, failure))
        with pytest.raises(TrainingDiverged if failure == "nan" else RuntimeError) as caught:
            train(new, overwrite=True, progress=False)
    if failure == "nan":
        assert f"the run it replaces is kept in {out}" in str(caught.value)
    assert snapshot(out) == before  # the old run, byte for byte, and nothing of the new one
    assert load_checkpoint(out).step == 8
    old.train.max_steps = 12
    resumed = train(old, resume=True, progress=False)
    assert resumed.steps == 12 and [r["step"] for r in metrics(old)] == list(range(1, 13))


def test_after_its_first_checkpoint_an_overwrite_leaves_only_the_new_run(tmp_path, monkeypatch):
    old = tiny(tmp_path, max_steps=8, ckpt_interval=4)
    train(old, progress=False)
    out = Path(old.train.out_dir)
    new = tiny(tmp_path, max_steps=8, ckpt_interval=3, lr=1e-3)
    with monkeypatch.context() as m:  # the new run dies at step 5, after its checkpoint at step 3
        m.setattr(GPT, "forward", failing_forward(5, "raise"))
        with pytest.raises(RuntimeError):
            train(new, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "checkpoint.json",
        "ckpt-0000003",
        "config.json",
        "metrics.jsonl",
    ]
    assert load_checkpoint(out).step == 3
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-3
    assert [r["step"] for r in metrics(new)] == [1, 2, 3, 4]  # the new run's lines only
    train(new, resume=True, progress=False)

    straight = tiny(tmp_path, "straight", max_steps=8, ckpt_interval=3, lr=1e-3)
    train(straight, progress=False)
    assert losses(metrics(new)) == losses(metrics(straight))  # no line of the old run is mixed in


def test_an_overwrite_killed_before_its_first_checkpoint_is_undone_on_the_next_start(tmp_path, capsys):
    old = tiny(tmp_path, max_steps=4, eval_interval=4, ckpt_interval=4)
    train(old, progress=False)
    out = Path(old.train.out_dir)
    before = snapshot(out)
    # what a kill leaves: the old run set aside, the new run's first metric lines, no pointer
    minimem.train._open_run_folder(out, resume=False, overwrite=True, log=print).close()
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 4.0}\n')
    (out / "config.json").write_text("{}\n")
    assert (out / "replaced-run" / "checkpoint.json").exists() and not (out / "checkpoint.json").exists()
    old.train.max_steps = 6
    train(old, resume=True, progress=False)
    assert "moved back the run that an interrupted --overwrite had set aside" in capsys.readouterr().out
    assert [r["step"] for r in metrics(old)] == list(range(1, 7)) and not (out / "replaced-run").exists()
    assert (out / "metrics.jsonl").read_bytes().startswith(before["metrics.jsonl"][1])  # the old run's lines

    # a kill while the old run was being moved aside: half of its files in replaced-run.tmp
    after = snapshot(out)
    (out / "replaced-run.tmp").mkdir()
    for name in ("checkpoint.json", "metrics.jsonl"):
        os.replace(out / name, out / "replaced-run.tmp" / name)
    with pytest.raises(SetupError, match="already holds a run"):  # moved back first, then refused
        train(old, progress=False)
    assert snapshot(out) == after


# ----------------------------------------------------------------------------- one writer


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from minimem.train import lock_run_folder\n"
            f"lock = lock_run_folder(Path({str(out)!r})); print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = write_config(tmp_path, max_steps=2, eval_interval=2)
        start = time.perf_counter()
        code, err = run_cli(capsys, "--config", str(cfg), "--out", str(out), "--no-progress")
        assert time.perf_counter() - start < 5  # at once: no waiting for the lock
        assert code == 2 and len(err) == 1, err
        assert f"{out} is in use by another training process (PID {holder.pid})" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert run_cli(capsys, "--config", str(cfg), "--out", str(out), "--no-progress")[0] == 0  # released at exit
    assert load_checkpoint(out).step == 2


# ----------------------------------------------------------------------------- torn metrics, full disk


def test_a_torn_last_metrics_line_is_cut_on_resume(tmp_path):
    straight = tiny(tmp_path, "straight", max_steps=8, ckpt_interval=100)
    train(straight, progress=False)
    config = tiny(tmp_path, max_steps=8, ckpt_interval=100)
    train(config, stop_at=4, progress=False)
    out = Path(config.train.out_dir)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_loss": 4.1')  # a kill in the middle of a write
    train(config, resume=True, progress=False)
    a, b = losses(metrics(straight)), losses(metrics(config))
    assert [r for r in b if r[0] != 4] == [r for r in a if r[0] != 4]  # the stop adds an evaluation at step 4


def test_a_full_disk_is_reported_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path, max_steps=6, ckpt_interval=2)
    out = tmp_path / "run"
    real_save, calls = torch.save, [0]

    def save_until_the_disk_fills(obj, path, *args, **kwargs):  # the optimiser file of the 2nd checkpoint
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(minimem.checkpoint.torch, "save", save_until_the_disk_fills)
        code, err = run_cli(capsys, "--config", str(cfg), "--out", str(out), "--no-progress")
    assert code == 1 and len(err) == 1, err
    assert f"no space left on device for the run folder {out}" in err[0]
    assert "the last good checkpoint is" in err[0] and "ckpt-0000002" in err[0]
    assert load_checkpoint(out).step == 2 and not list(out.glob("ckpt-*.tmp*"))
    assert run_cli(capsys, "--config", str(cfg), "--out", str(out), "--resume", "--no-progress")[0] == 0
    assert load_checkpoint(out).step == 6


# ----------------------------------------------------------------------------- memory


def fake_memory(monkeypatch, tmp_path, mem_available_kb: int, cgroup: tuple = ()):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {2 * mem_available_kb} kB\nMemAvailable: {mem_available_kb} kB\n")
    monkeypatch.setattr(minimem.guards, "MEMINFO", meminfo)
    limits = []
    for i, (limit, usage) in enumerate(cgroup):
        (tmp_path / f"max{i}").write_text(f"{limit}\n")
        (tmp_path / f"current{i}").write_text(f"{usage}\n")
        limits.append((tmp_path / f"max{i}", tmp_path / f"current{i}"))
    monkeypatch.setattr(minimem.guards, "CGROUP_LIMITS", tuple(limits))


def test_a_model_too_big_for_memory_is_refused_at_once_before_allocating(tmp_path, monkeypatch, capsys):
    fake_memory(monkeypatch, tmp_path, 16 * 2**20)  # 16 GiB available

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(GPT, "__init__", no_allocation)
    cfg = write_config(tmp_path)
    out = tmp_path / "run"
    start = time.perf_counter()
    code, err = run_cli(
        capsys,
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "model.n_embd=4096",
        "model.n_head=32",
        "model.n_layer=48",
        "model.ffn_hidden=10922",
        "model.block_size=256",
        "train.batch_size=16",
    )
    assert time.perf_counter() - start < 1.0
    assert code == 2 and len(err) == 1, err
    need = float(err[0].split("needs about ")[1].split(" GB")[0].replace(",", ""))
    assert 150 < need < 1000  # hundreds of GB: 9.7e9 parameters x 16 bytes, plus activations
    assert "17.2 GB is available (MemAvailable in" in err[0]
    assert "lower model.n_layer, model.n_embd" in err[0] and "train.batch_size" in err[0]
    assert not out.exists()


def test_available_memory_takes_the_smaller_of_meminfo_and_the_cgroup_limit(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    fake_memory(monkeypatch, tmp_path, 8 * 2**20, cgroup=[(6 * 2**30, 2**30)])
    available, source = minimem.guards.available_memory(cpu)
    assert available == 5 * 2**30 and "max0" in source
    fake_memory(monkeypatch, tmp_path, 8 * 2**20, cgroup=[("max", 2**30)])  # no limit
    assert minimem.guards.available_memory(cpu) == (8 * 2**30, f"MemAvailable in {tmp_path / 'meminfo'}")
    monkeypatch.setattr(minimem.guards, "MEMINFO", tmp_path / "missing")
    assert minimem.guards.available_memory(cpu) == (None, "unknown")
    config = tiny(tmp_path)
    minimem.train.check_memory(config, minimem.train.Distributed())  # unknown: no refusal


def test_memory_estimate_counts_the_real_parameters_and_grows_with_the_batch(tmp_path):
    config = tiny(tmp_path)
    small = estimate_memory(config)
    assert small["parameters"] == GPT(config.model).num_parameters() and small["states"] == 16 * small["parameters"]
    config.train.batch_size *= 2
    assert estimate_memory(config)["activations"] == 2 * small["activations"]
    assert estimate_memory(config, world_size=2)["activations"] == small["activations"]


# ----------------------------------------------------------------------------- --out that cannot be a run folder


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """``tmp/file.txt``, a read-only ``tmp/ro/`` and ``tmp/old/`` holding a run's metrics.

    chmod 0o555 does not stop root (these tests run as root in CI), so the writability probe
    is also made to fail for ``ro`` as it would for any other user.
    """
    (tmp_path / "file.txt").write_text("notes\n")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text('{"step": 1, "train_loss": 4.0}\n')
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("keep\n")
    ro.chmod(0o555)
    real = tempfile.TemporaryFile

    def probe(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == ro.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(minimem.guards.tempfile, "TemporaryFile", probe)
    write_config(tmp_path)
    yield tmp_path
    ro.chmod(0o755)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "{tmp}/file.txt"], "--out {tmp}/file.txt is a file, not a folder"),
        (["--out", "{tmp}/file.txt/run"], "--out {tmp}/file.txt/run is under {tmp}/file.txt, which is a file"),
        (["--out", "{tmp}/ro"], "--out {tmp}/ro: cannot write in {tmp}/ro (Permission denied): choose a writable"),
        (["--out", "{tmp}/ro/run"], "--out {tmp}/ro/run: cannot write in {tmp}/ro (Permission denied)"),
        (["--out", "{tmp}/old"], "--out {tmp}/old already holds a run: pass --resume to continue it or --overwrite"),
        (["--out", "{tmp}/old", "--resume", "--overwrite"], "--overwrite replaces it: pass only one"),
    ],
    ids=["file", "under-a-file", "read-only", "under-read-only", "holds-a-run", "resume-and-overwrite"],
)
def test_bad_out_is_one_line_exit_2_and_changes_nothing(folders, capsys, argv, message):
    tmp = folders
    before = snapshot(tmp)
    code, err = run_cli(capsys, "--config", str(tmp / "c.yaml"), "--no-progress", *[a.format(tmp=tmp) for a in argv])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("minimem train: error: ") and "Traceback" not in err[0]
    assert message.format(tmp=tmp) in err[0]
    assert snapshot(tmp) == before


def test_bad_out_in_a_real_process(tmp_path):
    (tmp_path / "file.txt").write_text("notes\n")
    cfg = write_config(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "minimem_tools",
            "train",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "file.txt"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"minimem train: error: --out {tmp_path / 'file.txt'} is a file, not a folder: "
        f"give the path of a folder (new or existing)"
    ]
    assert (tmp_path / "file.txt").read_text() == "notes\n"
