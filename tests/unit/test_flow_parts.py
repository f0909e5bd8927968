"""The Prefect flow's parts that need no server: its stage list, its parameters, its retry rule, its cache keys."""

from __future__ import annotations

import pytest
import yaml
from support.project import REPO, tiny_params

from flows.finetune import STAGE_NAMES
from flows.parameters import resolve_params
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
