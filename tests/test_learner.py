"""The capstone's switch: UltraMemV2, PKM and PEER built from the learner's solutions (minimem_tools.learner)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minimem.config import config_from_dict
from minimem.model import GPT
from minimem_tools import course, learner
from minimem_tools.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = {
    "model": {
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "block_size": 16,
        "ffn_hidden": 48,
        "memory": {"kind": "ultramemv2", "n_slots": 64, "topk": 4, "softmax": False},
    },
    "train": {"batch_size": 2, "max_steps": 2, "eval_interval": 2, "eval_iters": 1, "warmup_steps": 1},
}

PKM_TINY = {
    "model": dict(TINY["model"], memory={"kind": "pkm", "n_slots": 64, "heads": 2, "topk": 4}),
    "train": TINY["train"],
}

# Solutions written differently from the reference: product keys with torch.topk and the full m x m
# grid, a loop over slots for the read, the std from sigma_V^4 by exponentiation; the Tucker search
# delegates to the package's (exercise 5.2 is graded on its own)
CH2 = """
import torch

def product_key_topk(q1, q2, keys1, keys2, m):
    n = keys1.shape[0]
    s1, rows = torch.topk(q1 @ keys1.T, m)  # (T, m) best rows
    s2, cols = torch.topk(q2 @ keys2.T, m)  # (T, m) best columns
    grid = (s1[:, :, None] + s2[:, None, :]).flatten(1)  # (T, m*m)
    scores, cell = torch.topk(grid, m)
    return scores, rows.gather(1, cell // m) * n + cols.gather(1, cell % m)
"""
WRONG_CH2 = CH2.replace("* n + cols.gather(1, cell % m)", "+ n * cols.gather(1, cell % m)")  # row and column swapped
CH5 = """
import torch

def tucker_topk(s_row, s_col, cores, m):
    from minimem.tucker import tucker_topk as package
    return package(s_row, s_col, cores, m)
"""
CH6 = """
import torch

def principled_value_std(target_variance, sigma_s, d_pre, d_value, topk, heads, dim, score_mean=1.0):
    fourth = target_variance * dim / (0.16 * score_mean**2 * (1 + sigma_s**2) * d_pre * topk * heads * d_value)
    return fourth ** 0.25

def prevalue_read(values, pre_values, indices, scores, px, w_out):
    T, m, c = scores.shape
    width = values.shape[1] // c
    read = values.new_zeros(T, values.shape[1])
    for i in range(m):
        rows = indices[:, i]
        gate = (pre_values[rows] * px).sum(-1)  # (T,)
        weights = (scores[:, i] * gate[:, None]).repeat_interleave(width, dim=1)  # (T, D_v)
        read = read + weights * values[rows]
    return read @ w_out.T
"""
WRONG_CH6 = CH6.replace(
    "read = read + weights * values[rows]", "read = read + scores[:, i].mean(-1, keepdim=True) * values[rows]"
)


def exercises_folder(tmp_path, ch6=CH6, ch2=CH2, name="mine"):
    folder = tmp_path / name
    (folder / "graders").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "ch2_product_keys.py").write_text(textwrap.dedent(ch2))
    (folder / "ch5_ultramem.py").write_text(textwrap.dedent(CH5))
    (folder / "ch6_ultramemv2.py").write_text(textwrap.dedent(ch6))
    (folder / "ch7_triton.py").write_text(course.path("exercises/ch7_triton.py").read_text())  # the stubs
    return folder


def build(source=None, seed=0, tiny=TINY):
    config = config_from_dict(tiny).model
    torch.manual_seed(seed)
    if source is None:
        return GPT(config)
    with learner.use_exercises(source):
        return GPT(config)


def losses(model, steps=3):
    """The training losses of ``steps`` AdamW steps on fixed random batches."""
    optimizer, gen, out = torch.optim.AdamW(model.parameters(), lr=1e-2), torch.Generator().manual_seed(1), []
    for _ in range(steps):
        x, y = torch.randint(65, (4, 16), generator=gen), torch.randint(65, (4, 16), generator=gen)
        loss = model(x, y)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(loss.item())
    return torch.tensor(out)


def logits(model):
    x = torch.randint(65, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)[0]


def test_reference_solutions_rebuild_the_package_model_exactly():
    package, mine = build(), build("reference")
    assert learner.is_learners(mine) and not learner.is_learners(package)
    for name, tensor in package.state_dict().items():
        assert torch.equal(tensor, mine.state_dict()[name]), name
    torch.testing.assert_close(logits(mine), logits(package), rtol=0, atol=0)
    assert not learner.is_learners(build())  # the switch ends with the block


def test_a_learners_folder_written_differently_matches(tmp_path):
    mine = build(exercises_folder(tmp_path))
    assert learner.is_learners(mine)
    torch.testing.assert_close(logits(mine), logits(build()), rtol=1e-5, atol=1e-6)


def test_a_wrong_read_changes_the_model(tmp_path):
    mine = build(exercises_folder(tmp_path, WRONG_CH6))
    assert (logits(mine) - logits(build())).abs().max() > 1e-3


def test_the_untouched_stubs_say_which_exercise_to_write():
    with pytest.raises(NotImplementedError, match="exercise 6.1"):
        build("learner")  # the checkout's ./exercises holds the stubs


def test_cli_trains_from_solutions_and_rejects_other_kinds(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    import yaml

    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    args = ["--config", str(config), "--out", str(out), "--no-progress"]
    assert train_main([*args, "--use-exercises", "reference"]) == 0
    assert any(out.glob("ckpt-*")) or any(out.iterdir())
    assert train_main([*args, "--overwrite", "--use-exercises", str(exercises_folder(tmp_path))]) == 0
    capsys.readouterr()
    assert train_main([*args, "--overwrite", "--use-exercises"]) == 2  # the stubs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--use-exercises: exercise 6.1" in err[0]
    assert train_main([*args, "--overwrite", "--use-exercises", str(tmp_path / "nowhere")]) == 2
    assert "is not an exercises folder" in capsys.readouterr().err
    dense = dict(TINY, model={k: v for k, v in TINY["model"].items() if k != "memory"})
    config.write_text(yaml.safe_dump(dense))
    assert train_main([*args, "--overwrite", "--use-exercises", "reference"]) == 2
    assert "--use-exercises builds UltraMemV2, PKM or PEER" in capsys.readouterr().err


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_pkm_from_solutions_and_the_kernels_switch(tmp_path, capsys, monkeypatch):
    import yaml

    config = tmp_path / "pkm.yaml"
    config.write_text(yaml.safe_dump(PKM_TINY))
    args = ["--config", str(config), "--out", str(tmp_path / "run"), "--no-progress", "--overwrite"]
    assert train_main([*args, "--use-exercises", str(exercises_folder(tmp_path))]) == 0
    capsys.readouterr()
    assert train_main([*args, "--use-exercises"]) == 2  # the stubs: PKM's search is exercise 2.2
    assert "--use-exercises: exercise 2.2: write product_key_topk in exercises/ch2_product_keys.py" in one_error_line(
        capsys
    )
    assert train_main([*args, "--use-exercises-kernels"]) == 2
    assert "--use-exercises-kernels goes with --use-exercises" in one_error_line(capsys)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert train_main([*args, "--use-exercises", "reference", "--use-exercises-kernels"]) == 2
    assert "train.device is cpu, not cuda" in one_error_line(capsys)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may take the kernels: the stubs of 7.1 stop the run
    assert (
        train_main([*args, "--use-exercises", str(exercises_folder(tmp_path, name="k")), "--use-exercises-kernels"])
        == 2
    )
    assert "--use-exercises: exercise 7.1: write weighted_gather in exercises/ch7_triton.py" in one_error_line(capsys)


@pytest.mark.parametrize("memory", [{"kind": "pkm"}, {"kind": "peer"}, {"kind": "peer", "activation": "gelu"}])
def test_reference_product_keys_train_like_the_package(memory):
    tiny = dict(TINY, model=dict(TINY["model"], memory={"n_slots": 64, "heads": 2, "topk": 4, **memory}))
    package = build(tiny=tiny)
    torch.manual_seed(0)
    with learner.use_exercises("reference") as solutions:
        mine = GPT(config_from_dict(tiny).model)
    assert learner.is_learners(mine) and not learner.is_learners(package)
    assert not learner.is_learners(build(tiny=tiny))  # the switch ends with the block
    searched = []
    solutions.product_key_topk = lambda *args, search=solutions.product_key_topk: searched.append(1) or search(*args)
    mine_losses = losses(mine)
    assert len(searched) == 3 * 2  # 3 steps x 2 heads of the one memory block: the learner's search
    torch.testing.assert_close(mine_losses, losses(package), rtol=0, atol=1e-6)


def test_a_learners_product_keys_drive_the_pkm(tmp_path):
    package = build(tiny=PKM_TINY)
    right = build(exercises_folder(tmp_path), tiny=PKM_TINY)
    wrong = build(exercises_folder(tmp_path, ch2=WRONG_CH2, name="wrong"), tiny=PKM_TINY)
    assert learner.is_learners(right) and learner.is_learners(wrong)
    torch.testing.assert_close(logits(right), logits(package), rtol=1e-5, atol=1e-6)
    assert (logits(wrong) - logits(package)).abs().max() > 1e-3
    assert (losses(wrong) - losses(package)).abs().max() > 1e-3


def test_the_untouched_stubs_name_exercise_2_2_in_a_pkm():
    model = build("learner", tiny=PKM_TINY)  # builds: the search runs in the forward
    with pytest.raises(NotImplementedError, match="exercise 2.2"):
        logits(model)


# One forward and backward of tiny learner models whose read runs in the reference solutions' Triton
# kernels (exercises 7.1, 7.2) in Triton's interpreter on CPU, against the package's models with the
# same weights; then a backward that drops the score gradient must show in the key gradients.
INTERPRETED = """
import os
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
import torch
from minimem.config import config_from_dict
from minimem.model import GPT
from minimem_tools import learner

torch.set_num_threads(1)


def tiny(kind, **memory):
    model = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 8, "ffn_hidden": 48}
    return config_from_dict({"model": dict(model, memory={"kind": kind, "n_slots": 16, "topk": 2, **memory})}).model

def grads(model):
    x, y = (torch.randint(65, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    loss = model(x, y)[1]
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}

calls = []
for kind, memory in [("ultramemv2", {"softmax": False}), ("pkm", {"heads": 2}), ("peer", {})]:
    torch.manual_seed(0)
    package = GPT(tiny(kind, **memory))
    with learner.use_exercises("reference", kernels=True) as solutions:
        mine = GPT(tiny(kind, **memory))
    assert learner.is_learners(mine)
    mine.load_state_dict(package.state_dict())
    for name in learner.KERNELS["ch7_triton"]:
        kernel = getattr(solutions, name)
        setattr(solutions, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
    (loss, want), (got_loss, got) = grads(package), grads(mine)
    torch.testing.assert_close(got_loss, loss, rtol=1e-6, atol=1e-6)
    assert want.keys() == got.keys() and all(g is not None for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")
    print(kind, loss.item(), got_loss.item(), len(want), "gradients match")
    assert calls == ["weighted_gather", "weighted_gather_backward"], calls  # the read ran in the kernels
    if kind == "pkm":
        backward = solutions.weighted_gather_backward
        solutions.weighted_gather_backward = lambda *a: (backward(*a)[0], torch.zeros_like(a[3]))
        mine.zero_grad()
        bad = grads(mine)[1]
        assert not torch.allclose(bad["blocks.0.ffn.keys"], want["blocks.0.ffn.keys"])
        torch.testing.assert_close(bad["blocks.0.ffn.values"], want["blocks.0.ffn.values"], rtol=1e-4, atol=1e-6)
    calls.clear()
print("ok")
"""


@pytest.mark.slow  # about 10 s of CPU: Triton's interpreter and three tiny models in a subprocess
def test_the_learners_kernels_train_like_the_package_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
