"""Every bad input gets one clear line: the table of issue 12, section 3.

Each row is ``(argv, fragment)``: ``minimem <argv>`` must exit with 2 (a usage error), print
exactly one non-empty line on stderr that holds ``fragment`` (it names the flag or config field),
print no traceback, and leave every file and folder that existed before byte-for-byte as it was.
The rows run through the real entry point :func:`minimem_tools.cli.main`; a few also run as a real
``python -m minimem`` subprocess, to prove that nothing reaches the interpreter's traceback.

argparse's own errors have the same one-line shape (``minimem_tools.cli.ArgumentParser`` drops the usage
line argparse prints first), so every row checks the same thing. ``{tmp}`` in an argument is the
test's folder of fixtures, made by :func:`make_fixtures`.
"""

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import minimem.guards
from minimem_tools import cli

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "ffn_hidden": 16, "block_size": 8},
    "train": {"max_steps": 2, "eval_iters": 1, "batch_size": 2, "threads": 1},
}


def make_fixtures(tmp: Path) -> None:
    """Config files good and bad, a plain file, results folders with a torn and a foreign JSON."""
    (tmp / "ok.yaml").write_text(yaml.safe_dump(SMALL))
    (tmp / "empty.yaml").write_text("")
    (tmp / "comments.yaml").write_text("# only a comment\n")
    (tmp / "list.yaml").write_text("- model\n- train\n")
    (tmp / "scalar.yaml").write_text("42\n")
    (tmp / "latin1.yaml").write_bytes("train:\n  dataset: café\n".encode("latin-1"))
    (tmp / "broken.yaml").write_text("model:\n  n_layer: [1, 2\n")
    (tmp / "folder.yaml").mkdir()
    (tmp / "lr-null.yaml").write_text("train: {lr: null}\n")
    (tmp / "model-null.yaml").write_text("model: null\n")
    (tmp / "layers-null.yaml").write_text("model:\n  memory: {kind: pkm, layers: [null]}\n")
    (tmp / "lr-nan.yaml").write_text("train: {lr: .nan}\n")
    (tmp / "afile").write_text("not a folder\n")
    (tmp / "no-configs").mkdir()
    for folder, text in (("torn", '{"experiment": "density", "runs": [{"name": "dense", "se'), ("foreign", "[1, 2]\n")):
        (tmp / folder).mkdir()
        (tmp / folder / "density.json").write_text(text)
    (tmp / "work").mkdir()  # the working directory: a command that wrongly starts writes here


CONFIG = [  # a config file that is empty, not a mapping, not UTF-8, not YAML, a folder or missing
    (["train", "--config", "{tmp}/empty.yaml"], "empty.yaml is empty"),
    (["train", "--config", "{tmp}/comments.yaml"], "comments.yaml is empty"),
    (["train", "--config", "{tmp}/list.yaml"], "must hold a mapping of sections (model:, train:), got a YAML list"),
    (["train", "--config", "{tmp}/scalar.yaml"], "got a YAML int"),
    (["train", "--config", "{tmp}/latin1.yaml"], "latin1.yaml is not UTF-8 text"),
    (["train", "--config", "{tmp}/broken.yaml"], "broken.yaml is not valid YAML: "),
    (["train", "--config", "{tmp}/folder.yaml"], "folder.yaml is a folder; give a YAML file"),
    (["train", "--config", "{tmp}/missing.yaml"], "config file not found"),
    (["bench", "accounting", "{tmp}/list.yaml"], "got a YAML list"),
    (["bench", "train", "--configs", "{tmp}/empty.yaml"], "empty.yaml is empty"),
]
NULL = [  # null for a field or a whole section
    (["train", "--config", "{tmp}/lr-null.yaml"], "train.lr is null; give it a value"),
    (["train", "--config", "{tmp}/model-null.yaml"], "model is null"),
    (["train", "--config", "{tmp}/layers-null.yaml"], "model.memory.layers[0] is null"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "model.n_layer=null"], "model.n_layer is null"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.lr="], "train.lr is null"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "model.memory=~"], "model.memory is null"),
]
SET = [  # --set that does not parse, or names no field
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.lr=["], "--set 'train.lr=[': the value is not valid YAML"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.dataset_args={a: 1"], "is not valid YAML"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.lr"], "--set expects KEY=VALUE"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.lr.x=1"], "'train.lr' has no sub-keys"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.lr=fast"], "train.lr must be of type float"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.out_dir=[a]"], "train.out_dir must be a string"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "model.n_layer=2.5"], "model.n_layer must be an integer"),
]
NAN = [  # NaN or infinite floats, in a file or a --set
    (["train", "--config", "{tmp}/lr-nan.yaml"], "train.lr must be a finite number"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.lr=.inf"], "train.lr must be a finite number"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.min_lr=-.inf"], "train.min_lr must be a finite number"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.beta1=.nan"], "train.beta1 must be a finite number"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.grad_clip=.NaN"], "train.grad_clip must be a finite"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "model.dropout=.nan"], "model.dropout must be a finite number"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "model.rope_base=.inf"], "model.rope_base must be a finite"),
    (
        ["train", "--config", "{tmp}/ok.yaml", "--set", "model.moe.aux_loss_weight=nan"],
        "aux_loss_weight must be a finite",
    ),
    (
        ["train", "--config", "{tmp}/ok.yaml", "--set", "model.memory.kind=pkm", "model.memory.rank=7"],
        "model.memory.rank is not a field of kind 'pkm' (its fields: ",
    ),
    (
        ["train", "--config", "{tmp}/ok.yaml", "--set", "model.memory.kind=ultramemv2", "model.memory.sigma_s=.nan"],
        "sigma_s must be a finite number",
    ),
    (["bench", "accounting", "{tmp}/lr-nan.yaml"], "train.lr must be a finite number"),
]
ABSURD = [  # sizes no machine holds: refused by the config's bounds
    (["train", "--config", "{tmp}/ok.yaml", "--set", "model.n_embd=100000000"], "model.n_embd must be <= 1,048,576"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "model.n_layer=5000000"], "model.n_layer must be <= 1,024"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "model.vocab_size=10000000000"], "model.vocab_size must be <="),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.batch_size=1000000000"], "train.batch_size must be <="),
    (
        ["train", "--config", "{tmp}/ok.yaml", "--set", "model.memory.kind=pkm", "model.memory.n_slots=1000000000000"],
        "model.memory.n_slots must be <=",
    ),
]
RANGE = [  # config fields out of range
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.threads=-1"], "train.threads must be in [0, 1024]"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.threads=100000"], "train.threads must be in [0, 1024]"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.beta2=1.5"], "train.beta2 must be in [0, 1)"),
    (["train", "--config", "{tmp}/ok.yaml", "--set", "train.weight_decay=-0.1"], "train.weight_decay must be >= 0"),
    (
        ["train", "--config", "{tmp}/ok.yaml", "--set", "model.memory.kind=pkm", "model.memory.d_value=-8"],
        "model.memory.d_value must be >= 0",
    ),
]
BENCH = [  # bench arguments out of range, odd, too large or contradictory
    (["bench", "lookup", "--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["bench", "lookup", "--tokens", "-5"], "--tokens must be >= 1"),
    (["bench", "lookup", "--repeats", "0"], "--repeats must be >= 1"),
    (["bench", "lookup", "--sweep", "0,256"], "--sweep token counts must be >= 1"),
    (["bench", "lookup", "--sweep", "a,b"], "--sweep must be a comma list of token counts"),
    (["bench", "lookup", "--peak-gbps", "-1"], "--peak-gbps must be a positive number"),
    (["bench", "lookup", "--peak-gbps", "nan"], "--peak-gbps must be a positive number"),
    (["bench", "lookup", "--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["bench", "lookup", "--configs", "2b"], "--configs entries must be in"),
    (["bench", "lookup", "--tokens", "100000000"], "--tokens / --sweep / --configs as given need at least"),
    (["bench", "lookup", "--out", "{tmp}/afile/lookup.json"], "afile is a file"),
    (["bench", "lookup", "--out", "{tmp}/no-configs"], "is a folder; give the path of a .json file"),
    (["bench", "retrieval", "--n", "0"], "--n must be >= 1"),
    (["bench", "retrieval", "--m", "-3"], "--m must be >= 1"),
    (["bench", "retrieval", "--d-key", "255"], "--d-key must be even"),
    (["bench", "retrieval", "--d-key", "0"], "--d-key must be even and >= 2"),
    (["bench", "retrieval", "--tokens", "0"], "--tokens must be >= 1"),
    (["bench", "retrieval", "--threads", "-1"], "--threads must be in [0, 1024]"),
    (["bench", "retrieval", "--sweep", "8"], "every n (--n, --sweep) must be >= m=32"),
    (["bench", "retrieval", "--n", "1000000"], "--n / --sweep / --tokens / --d-key as given need at least"),
    (["bench", "retrieval", "--n", "x"], "argument --n: invalid int value: 'x'"),
    (["bench", "train", "--steps", "0"], "--steps must be >= 1"),
    (["bench", "train", "--threads", "-1"], "--threads must be in [0, 1024]"),
    (["bench", "train", "--configs", "{tmp}/missing.yaml"], "config file not found"),
    (["bench", "train", "--reference", "--configs", "{tmp}/ok.yaml"], "--reference always runs"),
    (["bench", "train", "--out", "{tmp}/run"], "--out is the run folder of --reference"),
    (["bench", "train", "--reference", "--out", "{tmp}/afile"], "--out {tmp}/afile is a file"),
    (["bench", "step", "--steps", "0"], "--steps must be >= 1"),
    (["bench", "step", "--repeats", "1"], "--repeats must be >= 2 (the verdict reads the spread of the rounds)"),
    (["bench", "step", "--threads", "0"], "--threads must all be in [1, 1024]"),
    (["bench", "step", "--against", "dense"], "--against needs --profile"),
    (["bench", "step", "--configs", "gpt"], "argument --configs: invalid choice: 'gpt'"),
    (["bench", "accounting", "{tmp}/ok.yaml", "--batch-sizes", "0"], "--batch-sizes must be positive integers"),
    (["bench", "accounting", "--dtype-bytes", "3", "{tmp}/ok.yaml"], "--dtype-bytes must be 1, 2, 4 or 8"),
    (["bench", "accounting", "--configs-dir", "{tmp}/no-configs"], "no configs found in"),
    (["bench", "accounting", "--plot", "{tmp}/afile/plot.png", "{tmp}/ok.yaml"], "afile is a file"),
    (["bench", "nope"], "unknown benchmark 'nope'"),
    (["bench", "all", "--quick"], "'all' takes no options"),
]
EXPERIMENT = [  # --out a file or under one, torn or foreign results with --resume, results kept, bad names and counts
    (["experiment", "density", "--out", "{tmp}/afile"], "--out {tmp}/afile is a file, not a folder"),
    (["experiment", "density", "--out", "{tmp}/afile/sub"], "is under {tmp}/afile, which is a file"),
    (["experiment", "density", "--resume", "--out", "{tmp}/torn"], "density.json is not valid JSON"),
    (["experiment", "all", "--resume", "--out", "{tmp}/torn"], "torn/density.json is not valid JSON"),
    (["experiment", "density", "--resume", "--out", "{tmp}/foreign"], "is not an experiment results file"),
    (["experiment", "report", "--out", "{tmp}/torn"], "density.json is not valid JSON"),
    (["experiment", "density", "--out", "{tmp}/torn"], "torn/density.json already holds results: pass --resume"),
    (["experiment", "all", "--out", "{tmp}/torn"], "torn/density.json already holds results"),
    (["experiment", "density", "--resume", "--overwrite", "--out", "{tmp}/torn"], "--overwrite replaces them: pass"),
    (["experiment", "report", "--overwrite"], "report only reads the results in --out; leave out --overwrite"),
    (["experiment", "report", "--quick"], "report only reads the results in --out; leave out --quick"),
    (["experiment", "nope"], "unknown experiment 'nope'"),
    (["experiment"], "give an experiment NAME"),
    (["experiment", "density", "--jobs", "0"], "--jobs must be >= 1"),
    (["experiment", "density", "--jobs", "100000"], "--jobs must be >= 1 and at most the"),
    (["experiment", "density", "--jobs", "x"], "argument --jobs: invalid int value"),
    (["experiment", "density", "--seeds", "0"], "--seeds must be a positive integer"),
    (["experiment", "density", "--fast"], "unrecognized arguments: --fast"),
]
DOCTOR_AND_CLI = [  # arguments the doctor does not take, commands that do not exist
    (["doctor", "--fast"], "takes no arguments, got --fast"),
    (["doctor", "cuda", "now"], "takes no arguments, got cuda now"),
    (["nope"], "unknown command 'nope'"),
]
CLASSES = {
    "config file": CONFIG,
    "null": NULL,
    "--set": SET,
    "NaN/inf": NAN,
    "absurd size": ABSURD,
    "config range": RANGE,
    "bench": BENCH,
    "experiment": EXPERIMENT,
    "doctor and cli": DOCTOR_AND_CLI,
}
ROWS = [
    pytest.param(argv, fragment, id=f"{kind}: {' '.join(argv)}")
    for kind, rows in CLASSES.items()
    for argv, fragment in rows
]


def snapshot(root: Path) -> dict:
    """Every path under ``root``: a folder's marker or a file's bytes (and mode: chmod counts too)."""
    return {
        str(p.relative_to(root)): ("dir" if p.is_dir() else p.read_bytes(), p.stat().st_mode)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def fixtures(tmp_path, monkeypatch):
    make_fixtures(tmp_path)
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def run_main(argv: list[str]) -> int:
    """``minimem argv`` in this process: the exit status, whether returned or raised by argparse."""
    try:
        return cli.main(argv)
    except SystemExit as exit:
        return exit.code


def check_one_line(code, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("minimem") and ": error: " in lines[0], lines[0]
    assert fragment in lines[0], lines[0]


def test_the_table_covers_every_class_with_50_rows():
    assert len(ROWS) >= 50
    assert all(len(rows) >= 1 for rows in CLASSES.values())


@pytest.mark.parametrize("argv, fragment", ROWS)
def test_bad_input_gets_one_line_and_changes_nothing(fixtures, capsys, argv, fragment):
    argv = [a.replace("{tmp}", str(fixtures)) for a in argv]
    before = snapshot(fixtures)
    code = run_main(argv)
    err = capsys.readouterr().err
    check_one_line(code, err, fragment.replace("{tmp}", str(fixtures)))
    assert snapshot(fixtures) == before


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--config", "{tmp}/latin1.yaml"], "is not UTF-8 text"),
        (["train", "--config", "{tmp}/ok.yaml", "--set", "train.lr=["], "is not valid YAML"),
        (["bench", "retrieval", "--d-key", "255"], "--d-key must be even"),
        (["bench", "lookup", "--tokens", "100000000"], "need at least"),
        (["experiment", "density", "--resume", "--out", "{tmp}/torn"], "density.json is not valid JSON"),
        (["doctor", "--fast"], "takes no arguments"),
    ],
)
def test_real_command_prints_no_traceback(fixtures, argv, fragment):
    argv = [a.replace("{tmp}", str(fixtures)) for a in argv]
    before = snapshot(fixtures)
    proc = subprocess.run(
        [sys.executable, "-m", "minimem_tools", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    check_one_line(proc.returncode, proc.stderr, fragment)
    assert snapshot(fixtures) == before


def test_read_only_out_folder_is_refused_before_any_run(fixtures, capsys, monkeypatch):
    readonly = fixtures / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    real = tempfile.TemporaryFile

    def probe(*args, dir=None, **kwargs):  # chmod does not stop root (CI runs as root): refuse as a user's OS would
        if dir is not None and Path(dir).resolve() == readonly.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(minimem.guards.tempfile, "TemporaryFile", probe)
    try:
        code = run_main(["experiment", "density", "--out", str(readonly / "sub")])
        check_one_line(code, capsys.readouterr().err, f"cannot write in {readonly} (Permission denied)")
        assert not (readonly / "sub").exists()
    finally:
        readonly.chmod(0o755)
