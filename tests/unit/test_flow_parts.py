"""The Prefect flow's parts that need no server: its stage list, its parameters, its retry rule, its cache keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from support.project import REPO, tiny_params

from flows.finetune import STAGE_NAMES
from flows.parameters import FINETUNE_KNOBS, KNOBS, SWEEP_KNOBS, ParamsOverrides, current, knob_layer, resolve_params
from flows.retries import is_transient
from tasks import ALL_STAGES, STAGES
from tuneline.errors import TunelineError


def test_dvc_stages_match_the_cli_order():
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert stages == ALL_STAGES and stages[1:] == STAGES


def test_flow_stages_match_dvc_yaml():
    assert STAGE_NAMES == list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def test_typed_overrides_and_sets_merge_onto_params_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 3, "seed": 7}, "gate": {"min_rouge_l": 0.5}}))
    params = resolve_params(path, {"train": {"epochs": 2, "seed": None}, "validate": {"max_duplicate_rate": 0.2}},
                            ["gate.min_rouge_l=0.1", "data.eval_path=null"])
    assert (params.train.epochs, params.train.seed) == (2, 7)  # empty keys keep params.yaml's value
    assert params.validate_.max_duplicate_rate == 0.2 and params.gate.min_rouge_l == 0.1
    assert params.data.eval_path is None
    with pytest.raises(TunelineError, match="train.epochs"):
        resolve_params(path, {"train": {"epochs": -1}})


def _form_schemas(project) -> dict[str, dict]:
    """The run forms as `prefect deploy` registers them: the flow modules imported in the project folder."""
    code = ("import json; from prefect.utilities.callables import parameter_schema as s; "
            "from flows.finetune import finetune; from flows.sweep import sweep; "
            "print(json.dumps({f.name: s(f).model_dump_for_openapi() for f in (finetune, sweep)}))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_run_forms_show_the_knobs_with_params_yaml_values_and_hide_internal_fields(tmp_path):
    params = tiny_params(tmp_path, train__learning_rate=0.0123, data__eval_path=None, gate__min_rouge_l=0.9,
                         lora__r=4, sweep__n_trials=3)
    tree = params.model_dump(mode="json", by_alias=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    forms = _form_schemas(tmp_path)

    for flow, knobs, extra in (("finetune", FINETUNE_KNOBS, ["refresh"]), ("sweep", SWEEP_KNOBS, [])):
        fields = forms[flow]["properties"]
        assert len(fields) <= 20
        # In order: the knobs, then the way to any other key (sets), then the typed rest (overrides), last.
        assert sorted(fields, key=lambda name: fields[name]["position"]) == [*knobs, *extra, "sets", "overrides"]
        assert not {"trigger", "data_hash", "params_path", "params"} & set(fields)
        for name, field in fields.items():
            assert field.get("description") and field.get("type"), (flow, name, field)
            assert "anyOf" not in field, (flow, name)  # a plain typed field: no `type | None` toggle
        for name in knobs:
            section, key = KNOBS[name][0].split(".")
            expected = "" if tree[section][key] is None else tree[section][key]  # eval_path null: empty
            assert fields[name]["default"] == expected, (flow, name)
        assert fields["sets"]["default"] == [] and fields["overrides"]["default"] == {}
    assert forms["finetune"]["properties"]["data_format"]["enum"] == ["instruction", "chat", "completion",
                                                                      "preference"]


def test_knobs_apply_where_they_differ_from_params_yaml_then_overrides_then_sets(tmp_path):
    form = {name: current(KNOBS[name][0]) for name in FINETUNE_KNOBS}  # what an untouched form sends
    assert knob_layer(form) == {}
    changed = form | {"lora_r": form["lora_r"] + 1, "eval_path": ""}
    assert knob_layer(changed) == {"lora.r": form["lora_r"] + 1, "data.eval_path": None}

    # params.yaml changed since the form was made: what the form left untouched follows the file.
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rate": 0.0009}, "lora": {"r": 2, "alpha": 8}}))
    params = resolve_params(path, knobs=knob_layer(form))
    assert (params.train.learning_rate, params.lora.r) == (0.0009, 2)
    params = resolve_params(path, knobs=knob_layer(changed))
    assert params.lora.r == form["lora_r"] + 1 and params.data.eval_path is None
    assert resolve_params(path, {"lora": {"r": 32}}, None, knob_layer(changed)).lora.r == 32
    assert resolve_params(path, ParamsOverrides(lora={"r": 32}), ["lora.r=64"], knob_layer(changed)).lora.r == 64
    assert ParamsOverrides(lora={"r": 32}).model_dump(mode="json") == {"lora": {"r": 32}}  # the Parameters tab


def test_only_transient_errors_are_retried():
    from botocore.exceptions import EndpointConnectionError
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    assert is_transient(ConnectionRefusedError("tracking server down"))
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    try:
        try:
            raise EndpointConnectionError(endpoint_url="http://minio:9000")
        except EndpointConnectionError as e:
            raise TunelineError("s3://bucket/train.jsonl: cannot reach the S3 endpoint") from e
    except TunelineError as wrapped:
        assert is_transient(wrapped)
    import sqlite3

    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert not is_transient(sqlite3.OperationalError("no such table: runs"))
    assert not is_transient(TunelineError("data/train.jsonl:3: field 'output': must be a string"))
    assert not is_transient(MlflowException("bad param", error_code=INVALID_PARAMETER_VALUE))


def test_cache_key_follows_code_params_and_data(tmp_path):
    from flows import cache

    params = tiny_params(tmp_path)
    params.data.train_path.parent.mkdir(parents=True)
    params.data.train_path.write_text('{"instruction": "a", "output": "b"}\n')
    params.data.eval_path.write_text('{"instruction": "c", "output": "d"}\n')
    key = cache.cache_key("validate", params)
    assert cache.cache_key("validate", params) == key
    assert cache.cache_key("validate", tiny_params(tmp_path, gate__min_rouge_l=0.9)) == key  # not its section
    assert cache.cache_key("validate", tiny_params(tmp_path, validate__max_duplicate_rate=0.5)) != key
    params.data.eval_path.write_text('{"instruction": "c", "output": "e"}\n')
    assert cache.cache_key("validate", params) != key
    assert cache.outputs("validate", params)[str(params.data.validated_dir)] is None  # not written yet
