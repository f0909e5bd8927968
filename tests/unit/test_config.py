"""params.yaml and the typed config: bad keys and values fail first, naming the key and the rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.project import REPO

from tuneline.config import ConfigError, Params, load_params


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def test_repo_params_yaml_is_the_default_config():
    loaded = load_params(REPO / "params.yaml")
    assert loaded == Params()


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: train.learnig_rate: unknown key"):
        load_params(write(tmp_path, {"train": {"learnig_rate": 0.1}}))


@pytest.mark.parametrize(("key", "value", "rule"), [
    ("train.learning_rate", -1, "greater than 0"),
    ("lora.r", 0, "greater than 0"),
    ("data.format", "xml", "'instruction', 'chat', 'completion' or 'preference'"),
    ("serving.port", 70000, "less than 65536"),
    ("train.batch_size", "many", "valid integer"),
    ("bootstrap.base", "gpt2", "'smollm2' or 'tiny'"),
])
def test_bad_values_name_key_and_rule(tmp_path, key, value, rule):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, {}), [f"{key}={value}"])
    assert key in str(err.value) and rule in str(err.value)


def test_the_tiny_base_has_no_general_answers_to_keep(tmp_path):
    with pytest.raises(ConfigError, match=r"bootstrap: Value error, general_records: the tiny base has no general"):
        load_params(write(tmp_path, {}), ["bootstrap.base=tiny"])
    assert load_params(write(tmp_path, {}), ["bootstrap.base=tiny", "bootstrap.general_records=0"]).bootstrap.base \
        == "tiny"


@pytest.mark.parametrize(("override", "message"), [
    ("lora.method=dora", "lora.method dora keeps PEFT's own"),
    ("distributed.strategy=deepspeed", "distributed.strategy deepspeed may hold sharded"),
])
def test_fused_lora_is_refused_where_it_does_not_apply(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, {}), ["train.fused_lora=true", override])
    assert load_params(write(tmp_path, {}), [override]).train.fused_lora == "auto"  # the default steps aside
    assert load_params(write(tmp_path, {}), ["train.fused_lora=true", "distributed.strategy=ddp"]).train.fused_lora


@pytest.mark.parametrize(("overrides", "on_gpu", "fused"), [
    ([], True, True), ([], False, False), (["lora.method=dora"], True, False), (["lora.method=qlora"], True, False),
    (["distributed.strategy=fsdp"], True, False), (["distributed.strategy=ddp"], True, True),
    (["train.fused_lora=true"], False, True), (["train.fused_lora=false"], True, False)])
def test_fused_lora_auto_is_on_a_gpu_where_it_applies(tmp_path, overrides, on_gpu, fused):
    from tuneline.training import lora_matmul

    assert lora_matmul.wanted(load_params(write(tmp_path, {}), overrides), on_gpu) is fused


def test_overrides_parse_yaml_values(tmp_path):
    params = load_params(write(tmp_path, {}), ["train.epochs=2", "lora.target_modules=[q_proj]",
                                               "data.eval_path=null"])
    assert params.train.epochs == 2
    assert params.lora.target_modules == ["q_proj"]
    assert params.data.eval_path is None


def test_override_needs_key_value(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_params(write(tmp_path, {}), ["train.epochs"])


def test_cli_fails_on_bad_params_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: -0.5\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 1
    assert "train.learning_rate" in proc.stderr and "greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
