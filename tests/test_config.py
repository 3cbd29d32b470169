"""minimem.config: loading, overrides, validation errors, and how ``minimem train`` reports them."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from minimem.config import (
    MEMORY_CONFIGS,
    MEMORY_DEFAULTS,
    Config,
    MemoryConfig,
    ModelConfig,
    MoEConfig,
    PEERConfig,
    PKMConfig,
    TrainConfig,
    UltraMemConfig,
    UltraMemV2Config,
    apply_overrides,
    config_from_dict,
    load_config,
)
from minimem_tools.train import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "configs" / "shakespeare-dense.yaml", REPO / "configs" / "shakespeare-moe.yaml"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------------- loading


def test_yaml_and_json_round_trip(tmp_path):
    config = load_config(write(tmp_path, {"model": {"n_layer": 3, "moe": {"top_k": 1}}, "train": {"lr": 0.002}}))
    assert config.model.n_layer == 3 and config.model.moe.top_k == 1 and config.train.lr == 0.002
    assert config.model.n_embd == ModelConfig().n_embd  # unnamed fields keep their defaults
    assert config_from_dict(json.loads(config.to_json())) == config
    config.save_json(tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == config


def test_overrides_reach_nested_fields_and_are_typed(tmp_path):
    path = write(tmp_path, {"train": {"lr": 0.002}})
    config = load_config(
        path, ["train.lr=1e-3", "model.moe.top_k=3", "model.ffn=moe", "train.dataset_args={n_pairs: 4}"]
    )
    assert config.train.lr == 0.001 and isinstance(config.train.lr, float)  # YAML reads 1e-3 as a string
    assert config.model.moe.top_k == 3 and config.model.ffn == "moe"
    assert config.train.dataset_args == {"n_pairs": 4}
    assert apply_overrides({}, ["train.seed=7"]) == {"train": {"seed": 7}}


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"model": {"n_lyer": 3}}, [], r"unknown config key 'model\.n_lyer'"),
        ({"trian": {}}, [], r"unknown config key 'trian'"),
        ({}, ["train.lrr=1"], r"unknown config key 'train\.lrr' in --set"),
        ({}, ["model.moe.topk=1"], r"unknown config key 'model\.moe\.topk'"),
        ({}, ["train.lr"], r"--set expects KEY=VALUE"),
        ({}, ["train.lr.x=1"], r"'train\.lr' has no sub-keys"),
        ({"model": {"n_layer": 2.5}}, [], r"model\.n_layer must be an integer"),
        ({"model": {"n_layer": True}}, [], r"model\.n_layer must be a number"),
        ({"model": {"tie_embeddings": "maybe"}}, [], r"model\.tie_embeddings must be a boolean"),
        ({"train": {"lr": "fast"}}, [], r"train\.lr must be of type float"),
        ({"model": "big"}, [], r"model must be a mapping"),
    ],
)
def test_bad_keys_and_types_name_the_field(tmp_path, data, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path, data), overrides)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="not valid YAML") as err:
        load_config(write(tmp_path, "model:\n  n_layer: [1, 2\n"))
    # yaml's own message spans four lines; the loader's is one, with the place of the problem
    assert "\n" not in str(err.value) and str(err.value).endswith("at line 3, column 1")
    with pytest.raises(ValueError, match=r"--set 'train\.lr=\[': the value is not valid YAML") as err:
        load_config(write(tmp_path, {}), ["train.lr=["])
    assert "\n" not in str(err.value)


def test_null_values_and_empty_files_are_errors_not_defaults(tmp_path):
    with pytest.raises(ValueError, match=r"c\.yaml is empty"):
        load_config(write(tmp_path, "# nothing here\n"))
    with pytest.raises(ValueError, match=r"^model is null; give it a value, or leave the key out"):
        load_config(write(tmp_path, "model: null\n"))
    with pytest.raises(ValueError, match=r"train\.lr is null"):
        load_config(write(tmp_path, {"train": {"lr": None}}))
    with pytest.raises(ValueError, match=r"model is null"):  # --set cannot fill a null section either
        load_config(write(tmp_path, "model: null\n"), ["model.n_layer=2"])
    assert load_config(write(tmp_path, "{}\n")) == Config()  # an explicit empty mapping: every default


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=.nan",
        "train.lr=.inf",
        "train.lr=-.inf",
        "train.lr=nan",
        "train.beta2=.nan",
        "model.dropout=.nan",
        "model.memory.sigma_s=.inf",
    ],
)
def test_every_float_field_rejects_nan_and_inf(tmp_path, override):
    field = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"^{field} must be a finite number"):  # sigma_s: an ultramemv2 field
        load_config(write(tmp_path, {"model": {"memory": {"kind": "ultramemv2"}}}), [override])


def test_threads_zero_keeps_the_default_and_negative_is_an_error(tmp_path):
    assert load_config(write(tmp_path, {}), ["train.threads=0"]).train.threads == 0
    with pytest.raises(ValueError, match=r"train\.threads must be in \[0, 1024\] \(0 keeps torch's default\)"):
        load_config(write(tmp_path, {}), ["train.threads=-1"])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "model, message",
    [
        (
            dict(ffn="moe", moe=MoEConfig(n_experts=4, top_k=5)),
            r"moe\.top_k must be between 1 and moe\.n_experts=4, got 5",
        ),
        (dict(moe=MoEConfig(n_experts=0)), r"moe\.n_experts must be >= 1"),
        (dict(moe=MoEConfig(d_expert=0)), r"moe\.d_expert"),
        (dict(n_embd=130, n_head=4), r"model\.n_embd=130 must be divisible by model\.n_head=4"),
        (dict(n_embd=36, n_head=4), r"model\.n_embd / model\.n_head = 9 must be even"),
        (dict(ffn="gelu"), r"model\.ffn must be one of \('dense', 'moe'\)"),
        (dict(dropout=1.0), r"model\.dropout must be in \[0, 1\)"),
        (dict(n_layer=0), r"model\.n_layer must be >= 1"),
    ],
)
def test_invalid_model_configs(model, message):
    with pytest.raises(ValueError, match=message):
        Config(model=ModelConfig(**model)).validate()


@pytest.mark.parametrize(
    "train, message",
    [
        (dict(lr=0.0), r"train\.lr must be > 0"),
        (dict(lr=1e-3, min_lr=1e-2), r"train\.min_lr must be in \[0, train\.lr"),
        (dict(batch_size=0), r"train\.batch_size must be >= 1"),
        (dict(warmup_steps=-1), r"train\.warmup_steps"),
        (dict(value_lr_mult=0.0), r"train\.value_lr_mult must be > 0"),
        (dict(value_lr_schedule="cosine"), r"train\.value_lr_schedule must be 'constant' or 'linear_decay'"),
    ],
)
def test_invalid_train_configs(train, message):
    with pytest.raises(ValueError, match=message):
        Config(train=TrainConfig(**train)).validate()


# ----------------------------------------------------------------------------- shipped configs


def test_shipped_configs_load_and_match_activated_parameters():
    from minimem.accounting import count_parameters

    dense, moe = (load_config(p) for p in CONFIGS)
    assert dense.model.ffn == "dense" and moe.model.ffn == "moe"
    assert dataclasses.replace(moe.train, out_dir=dense.train.out_dir) == dense.train  # the same recipe
    d, m = count_parameters(dense.model), count_parameters(moe.model)
    assert abs(m["activated"] - d["activated"]) / d["activated"] < 0.005
    assert m["total"] > 2 * d["total"]
    for path, counts in ((CONFIGS[0], d), (CONFIGS[1], m)):  # the YAML comments state the numbers
        text = path.read_text()
        assert f"{counts['activated']:,}" in text and f"{counts['total']:,}" in text


# ----------------------------------------------------------------------------- the command line


def run_cli(capsys, *argv):
    code = main(["--no-progress", *argv])
    out = capsys.readouterr()
    return code, out.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "missing.yaml"], r"config file not found: missing\.yaml"),
        (["--set", "train.lrr=1"], r"unknown config key 'train\.lrr'"),
        (
            ["--set", "model.ffn=moe", "model.moe.n_experts=4", "model.moe.top_k=8"],
            r"moe\.top_k must be between 1 and moe\.n_experts=4, got 8",
        ),
        (["--set", "model.n_embd=126"], r"model\.n_embd=126 must be divisible by model\.n_head=4"),
        (["--set", "train.dataset=wiki"], r"dataset must be one of"),
        (["--set", "train.device=tpu"], r"train\.device must be"),
        (["--set", "train.grad_clip=-1"], r"train\.grad_clip must be >= 0"),
        (["--resume"], r"--resume: no checkpoint in"),
        (["--max-steps", "0"], r"train\.max_steps must be >= 1"),
    ],
)
def test_cli_reports_bad_input_in_one_line_with_exit_2(tmp_path, capsys, args, message):
    import re

    config = write(tmp_path, {"model": {"n_layer": 1, "n_embd": 16, "ffn_hidden": 16, "block_size": 8}})
    if args[:2] != ["--config", "missing.yaml"]:
        args = ["--config", str(config), "--out", str(tmp_path / "run"), *args]
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("minimem train: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_cli_reports_a_corrupt_checkpoint_on_resume(tmp_path, capsys):
    config = write(
        tmp_path,
        {
            "model": {"n_layer": 1, "n_embd": 16, "ffn_hidden": 16, "block_size": 8},
            "train": {"max_steps": 2, "eval_iters": 1, "batch_size": 2, "threads": 1},
        },
    )
    out = tmp_path / "run"
    assert run_cli(capsys, "--config", str(config), "--out", str(out))[0] == 0
    weights = out / "ckpt-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    code, err = run_cli(capsys, "--config", str(config), "--out", str(out), "--resume", "--max-steps", "4")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("minimem train: error: corrupt checkpoint file") and "model.safetensors" in err


def test_cli_resume_without_config_uses_the_run_config(tmp_path, capsys):
    config = write(
        tmp_path,
        {
            "model": {"n_layer": 1, "n_embd": 16, "ffn_hidden": 16, "block_size": 8},
            "train": {
                "max_steps": 4,
                "eval_iters": 1,
                "batch_size": 2,
                "ckpt_interval": 2,
                "log_interval": 1,
                "threads": 1,
            },
        },
    )
    out = tmp_path / "run"
    assert run_cli(capsys, "--config", str(config), "--out", str(out))[0] == 0
    assert run_cli(capsys, "--out", str(out), "--resume", "--max-steps", "6")[0] == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    code, err = run_cli(capsys)
    assert code == 2 and "--config is required" in err


# ----------------------------------------------------------------------------- one config class per memory kind

# The memory dict every config saved before the per-kind classes holds (the old 20-field MemoryConfig).
OLD_MEMORY = dict(
    kind="none",
    layers=[],
    n_slots=4096,
    heads=1,
    topk=16,
    d_key=0,
    d_value=0,
    d_pre=0,
    query_norm="layernorm",
    softmax=True,
    rank=2,
    cores=2,
    expansion=4,
    skip=[],
    activation="none",
    ring_group=1,
    value_init="principled",
    sigma_s=0.0,
    pre_values=True,
    value_projections=1,
)
# kind -> (its class, a valid non-default memory of that kind, a field of another kind with a value)
KINDS = {
    "none": (MemoryConfig, {}, ("n_slots", 4096)),
    "pkm": (PKMConfig, dict(n_slots=256, topk=8, layers=[1], query_norm="batchnorm"), ("rank", 7)),
    "peer": (PEERConfig, dict(n_slots=256, heads=2, activation="gelu"), ("d_value", 64)),
    "ultramem": (UltraMemConfig, dict(skip=[[0, 2]], expansion=1, softmax=False), ("layers", [1])),
    "ultramemv2": (UltraMemV2Config, dict(n_slots=1024, d_pre=24, value_init="paper"), ("query_norm", "layernorm")),
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_loads_into_its_class_and_round_trips(tmp_path, kind):
    cls, memory, _ = KINDS[kind]
    config = load_config(write(tmp_path, {"model": {"memory": {"kind": kind, **memory}}}))
    assert type(config.model.memory) is cls and MEMORY_CONFIGS[kind] is cls
    assert config.model.memory == cls(**memory)  # every other field at its default
    assert sorted(config.to_dict()["model"]["memory"]) == sorted(f.name for f in dataclasses.fields(cls))
    assert config_from_dict(json.loads(config.to_json())) == config
    assert config_from_dict(json.loads(config.to_json()), saved=True) == config
    config.save_json(tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == config


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("via", ["yaml", "--set"])
def test_a_field_of_another_kind_is_rejected_with_its_name(tmp_path, kind, via):
    cls, memory, (field, value) = KINDS[kind]
    assert field not in {f.name for f in dataclasses.fields(cls)} and field in MEMORY_DEFAULTS
    data = {"model": {"memory": {"kind": kind, **memory}}}
    if via == "yaml":
        data["model"]["memory"][field] = value
    overrides = [f"model.memory.{field}={json.dumps(value)}"] if via == "--set" else []
    message = rf"^model\.memory\.{field} is not a field of kind '{kind}' \(its fields: .*\bkind\b"
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path, data), overrides)
    if field != "n_slots":  # a foreign field is an error at its default value too
        data["model"]["memory"][field] = MEMORY_DEFAULTS[field]
        with pytest.raises(ValueError, match=message):
            config_from_dict(data)


def test_the_kind_can_change_with_set_and_an_unknown_memory_key_is_named(tmp_path):
    path = write(tmp_path, {"model": {"memory": {"kind": "pkm", "n_slots": 256, "topk": 8}}})
    config = load_config(path, ["model.memory.kind=ultramemv2", "model.memory.rank=3"])
    assert config.model.memory == UltraMemV2Config(n_slots=256, topk=8, rank=3)
    with pytest.raises(ValueError, match=r"unknown config key 'model\.memory\.rnak' in --set"):
        load_config(path, ["model.memory.rnak=3"])
    with pytest.raises(ValueError, match=r"model\.memory\.kind must be one of \('none', 'pkm'"):
        load_config(path, ["model.memory.kind=pkn"])
    with pytest.raises(ValueError, match=r"model\.memory\.kind of a PKMConfig must be 'pkm', got 'peer'"):
        ModelConfig(memory=PKMConfig(kind="peer")).validate()


@pytest.mark.parametrize("kind", KINDS)
def test_a_config_saved_in_the_old_format_still_loads(kind):
    cls, memory, _ = KINDS[kind]
    old = {**OLD_MEMORY, "kind": kind, **memory}
    saved = {"model": {"n_layer": 4, "memory": old}, "train": {"lr": 2e-3}}
    config = config_from_dict(json.loads(json.dumps(saved)), saved=True)
    assert config.model.memory == cls(**memory) and config.train.lr == 2e-3
    with pytest.raises(ValueError, match=r"is not a field of kind"):  # a user's config may not do this
        config_from_dict(json.loads(json.dumps(saved)))
    field, value = KINDS[kind][2]
    if value != OLD_MEMORY[field]:  # a foreign field that held a value is never dropped silently
        saved["model"]["memory"][field] = value
        with pytest.raises(ValueError, match=rf"model\.memory\.{field} is not a field of kind '{kind}' and differs"):
            config_from_dict(saved, saved=True)


def test_an_old_format_checkpoint_and_results_file_still_load(tmp_path, monkeypatch):
    from minimem.checkpoint import load_checkpoint, load_model, save_checkpoint
    from minimem.model import GPT
    from minimem_tools.experiments.runner import _config_key

    memory = dict(kind="pkm", n_slots=64, topk=4)
    config = config_from_dict({"model": {"n_layer": 2, "n_embd": 16, "n_head": 2, "block_size": 8, "memory": memory}})
    old = config.to_dict()
    old["model"]["memory"] = {**OLD_MEMORY, **memory}  # what Config.to_dict() wrote before the split
    monkeypatch.setattr(Config, "to_json", lambda self: json.dumps(old, indent=2, sort_keys=True))
    save_checkpoint(tmp_path, 1, GPT(config.model), None, config)
    monkeypatch.undo()
    assert json.loads((tmp_path / "ckpt-0000001" / "config.json").read_text())["model"]["memory"]["rank"] == 2
    assert load_checkpoint(tmp_path).config == config
    assert isinstance(load_model(tmp_path), GPT)
    # results/*.json runs: --resume matches an old run's config to the same config written today
    assert _config_key(old) == _config_key(config.to_dict())


# ----------------------------------------------------------------------------- retrieval options (issue 14)


@pytest.mark.parametrize("kind", ["ultramem", "ultramemv2"])
def test_tucker_retrieval_options_default_to_todays_retrieval_and_are_checked(tmp_path, kind):
    cls, memory, _ = KINDS[kind]
    assert (cls.search, cls.candidates, cls.rank1_sign, cls.qk_norm) == ("tdqkr", 0, "fixed", "layernorm")
    path = write(tmp_path, {"model": {"memory": {"kind": kind, **memory}}})
    options = ["model.memory.search=exact", "model.memory.candidates=20", "model.memory.qk_norm=rmsnorm"]
    config = load_config(path, options + ["model.memory.rank1_sign=continuous"])
    assert config.model.memory == cls(
        **memory, search="exact", candidates=20, qk_norm="rmsnorm", rank1_sign="continuous"
    )
    for override, message in (
        ("search=topk", r"model\.memory\.search must be one of \('tdqkr', 'signed', 'exact'\), got 'topk'"),
        ("rank1_sign=none", r"model\.memory\.rank1_sign must be one of \('fixed', 'continuous'\), got 'none'"),
        ("qk_norm=batchnorm", r"model\.memory\.qk_norm must be one of \('layernorm', 'rmsnorm'\), got 'batchnorm'"),
        ("candidates=-1", r"model\.memory\.candidates must be 0 or in \[m=16, n_keys\], got -1"),
    ):
        with pytest.raises(ValueError, match=message):
            load_config(path, [f"model.memory.{override}"])
    if kind == "ultramemv2":
        assert cls.share_ratio == 0 and load_config(path, ["model.memory.share_ratio=1"]).model.memory.share_ratio == 1
        with pytest.raises(ValueError, match=r"model\.memory\.share_ratio=3 must divide the memory layers L=6"):
            load_config(path, ["model.memory.share_ratio=3", "model.n_layer=6"])  # 1024 slots: not divisible by 3
