"""The capstone's switch: UltraMemV2 built from the learner's exercise solutions (minimem_tools.learner)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from minimem.config import config_from_dict
from minimem.model import GPT
from minimem_tools import learner
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

# Solutions written differently from the reference: a loop over slots for the read, the std from
# sigma_V^4 by exponentiation; the search delegates to the package's (exercise 5.2 is graded on its own)
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


def exercises_folder(tmp_path, ch6=CH6):
    folder = tmp_path / "mine"
    (folder / "graders").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "ch5_ultramem.py").write_text(textwrap.dedent(CH5))
    (folder / "ch6_ultramemv2.py").write_text(textwrap.dedent(ch6))
    return folder


def build(source=None, seed=0):
    config = config_from_dict(TINY).model
    torch.manual_seed(seed)
    if source is None:
        return GPT(config)
    with learner.use_exercises(source):
        return GPT(config)


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
    assert "--use-exercises builds UltraMemV2" in capsys.readouterr().err
