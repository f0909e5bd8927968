"""The validate stage: good data passes and is written; bad data fails clearly and writes nothing."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from support.project import REPO

from tasks.validate import run, validate_paths
from tasks.validate.expectations import Suite
from tasks.validate.records import check_file
from tuneline import tracking
from tuneline.config import Params
from tuneline.errors import DataError


def ins(i: int, **kw) -> dict:
    return {"instruction": f"Do task {i}", "input": f"words {i}", "output": f"answer {i}", **kw}


def chat(i: int) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}"}]}


def comp(i: int) -> dict:
    return {"prompt": f"The number {i} is", "completion": f" {i}."}


MAKERS = {"instruction": ins, "chat": chat, "completion": comp}


def jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


class Work:
    """A tmp project: raw files, params pointing at them, and the outputs to look for."""

    def __init__(self, root: Path):
        self.root = root
        self.train, self.eval = root / "raw" / "train.jsonl", root / "raw" / "eval.jsonl"
        self.validated, self.report = root / "data" / "validated", root / "reports" / "validation.json"
        self.train.parent.mkdir(parents=True)

    def write(self, train: str | bytes, eval: str | bytes | None = None) -> None:
        for path, content in ((self.train, train), (self.eval, eval)):
            if content is not None:
                path.write_bytes(content.encode() if isinstance(content, str) else content)

    def params(self, fmt: str = "instruction", holdout: bool = False, seed: int = 42, **validate) -> Params:
        return Params.model_validate({
            "reports_dir": str(self.root / "reports"),
            "data": {"train_path": str(self.train), "eval_path": None if holdout else str(self.eval),
                     "format": fmt, "eval_split": 0.25, "validated_dir": str(self.validated)},
            "validate": validate, "train": {"seed": seed}})

    def outputs(self) -> list[Path]:
        return [p for p in (self.validated, self.report) if p.exists()]

    def read(self, split: str) -> list[dict]:
        text = (self.validated / f"{split}.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Work:
    monkeypatch.chdir(tmp_path)
    return Work(tmp_path)


# ---------------------------------------------------------------- good data


@pytest.mark.parametrize("fmt", ["instruction", "chat", "completion"])
def test_good_data_passes_and_writes_outputs(work, fmt):
    make = MAKERS[fmt]
    work.write(jsonl([make(i) for i in range(20)]), jsonl([make(i) for i in range(100, 105)]))
    summary = run(work.params(fmt))
    assert summary == {"train_records": 20, "eval_records": 5, "duplicate_rate": 0.0, "overlap_rate": 0.0}
    assert work.read("train") == [make(i) for i in range(20)]
    assert work.read("eval") == [make(i) for i in range(100, 105)]
    report = json.loads(work.report.read_text())
    assert set(report) >= {"format", "eval_source", "limits", "splits", "duplicate_rate", "overlap_rate",
                           "expectations", "success"}
    assert report["success"] and report["splits"]["train"]["records"] == 20
    assert report["splits"]["eval"]["overlap_rate"] == 0.0 and report["splits"]["train"]["duplicates"] == 0
    assert report["splits"]["train"]["max_chars"]
    kinds = {e["expectation"] for e in report["expectations"]}
    assert {"expect_column_values_to_not_be_null", "expect_column_value_lengths_to_be_between",
            "expect_column_values_to_be_in_set"} <= kinds
    assert all(e["success"] for e in report["expectations"])
    assert not list(work.root.glob("mlflow.db")) and not (work.root / "mlruns").exists()  # MLflow untouched


def test_normalizes_crlf_bom_and_optional_input(work):
    train = "\ufeff" + "".join(json.dumps(r) + "\r\n" for r in [{"instruction": "a", "output": "b"},
                                                                  *[ins(i) for i in range(9)]])
    work.write(train, jsonl([ins(50)]))
    run(work.params())
    assert work.read("train")[0] == {"instruction": "a", "input": "", "output": "b"}  # one shape for all
    raw = (work.validated / "train.jsonl").read_bytes()
    assert b"\r" not in raw and not raw.startswith(b"\xef\xbb\xbf")


def test_duplicates_and_overlap_within_limits_pass(work):
    train = [ins(i) for i in range(20)] + [ins(3)]  # 1 of 21 repeats: rate 0.048 <= 0.05
    work.write(jsonl(train), jsonl([ins(5, output="other"), ins(60)]))
    summary = run(work.params(max_overlap_rate=0.5))
    assert summary["duplicate_rate"] == pytest.approx(1 / 21, abs=1e-6) and summary["overlap_rate"] == 0.5


def test_logs_to_mlflow_only_inside_a_pipeline_run(work, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(log_metrics=lambda m: calls.append(("metrics", m)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setattr(tracking, "pipeline_run", lambda p: contextlib.nullcontext(calls.append("run")))
    monkeypatch.setattr(tracking, "log_section_params", lambda p, *s: calls.append(("params", s)))
    work.write(jsonl([ins(i) for i in range(5)]), jsonl([ins(9)]))
    run(work.params())
    assert calls == []
    run(work.params().in_mlflow_run("abc123"))
    assert calls[:2] == ["run", ("params", ("data", "validate"))]
    assert calls[2][1]["validate.splits.train.records"] == 5.0 and calls[2][1]["validate.overlap_rate"] == 0.0


def test_holdout_is_deterministic_and_never_overlaps(work):
    # Records 0..3 share one prompt (different answers): the hold-out must keep them on one side.
    train = [ins(0, output=f"answer v{k}") for k in range(4)] + [ins(i) for i in range(1, 37)]
    work.write(jsonl(train))
    first = run(work.params(holdout=True))
    assert first["train_records"] + first["eval_records"] == 40 and first["overlap_rate"] == 0.0
    held, kept = work.read("eval"), work.read("train")
    assert sum(r["instruction"] == "Do task 0" for r in held) in (0, 4)
    run(work.params(holdout=True))
    assert work.read("eval") == held and work.read("train") == kept
    run(work.params(holdout=True, seed=7))
    assert work.read("eval") != held
    assert "hold-out" in json.loads(work.report.read_text())["eval_source"]


def test_holdout_needs_two_distinct_prompts(work):
    work.write(jsonl([ins(0, output=f"v{k}") for k in range(5)]))
    with pytest.raises(DataError, match="at least two distinct prompts"):
        run(work.params(holdout=True))
    assert work.outputs() == []


def test_validate_paths_counts_per_file_and_writes_nothing(work):
    work.write(jsonl([ins(i) for i in range(7)]), jsonl([ins(i) for i in range(3)]))
    counts = validate_paths([work.train, work.eval], "instruction", work.params().validate_)
    assert counts == {str(work.train): 7, str(work.eval): 3}
    assert work.outputs() == []
    work.write(jsonl([ins(1), ins(2), ins(1)]))
    with pytest.raises(DataError, match=r"train\.jsonl:3: .*duplicate rate 0\.333"):
        validate_paths([work.train], "instruction", work.params().validate_)


# ---------------------------------------------------------------- bad data

G = jsonl([ins(1), ins(2)])  # two good lines: the bad line below is line 3
C = jsonl([chat(1)])
BAD = [  # id, format, train, eval (None: a good one), file, line, field, words in the rule
    ("truncated-json", "instruction", G + '{"instruction": "a", "output": "b', None,
     "train", 3, None, "truncated"),
    ("wrong-type", "instruction", G + '{"instruction": "a", "output": 5}\n', None,
     "train", 3, "output", "must be a string, got a number"),
    ("null-value", "instruction", G + '{"instruction": "a", "output": null}\n', None,
     "train", 3, "output", "got null"),
    ("missing-field", "instruction", G + '{"instruction": "a"}\n', None,
     "train", 3, "output", "required field is missing"),
    ("extra-field", "instruction", G + '{"instruction": "a", "output": "b", "score": 1}\n', None,
     "train", 3, "score", "unknown field 'score'"),
    ("empty-string", "instruction", G + '{"instruction": "a", "output": ""}\n', None,
     "train", 3, "output", "must not be empty"),
    ("whitespace-string", "completion", '{"prompt": " \\t\\n", "completion": "b"}\n', None,
     "train", 1, "prompt", "whitespace-only"),
    ("empty-file", "instruction", "", None, "train", None, None, "file has no records"),
    ("whitespace-only-file", "instruction", " \n\n\t\n", None, "train", None, None, "file has no records"),
    ("invalid-utf8", "instruction", G.encode() + b'{"instruction": "caf\xe9", "output": "b"}\n', None,
     "train", 3, None, "not valid UTF-8"),
    ("nul-byte", "instruction", G.encode() + b'{"instruction": "a\x00", "output": "b"}\n', None,
     "train", 3, None, "NUL byte"),
    ("not-an-object", "instruction", G + "[1, 2]\n", None, "train", 3, None, "expected a JSON object"),
    ("bad-chat-role", "chat", C + '{"messages": [{"role": "bot", "content": "hi"}]}\n', None,
     "train", 2, "messages[0].role", "must be one of system, user, assistant"),
    ("empty-messages", "chat", C + '{"messages": []}\n', None, "train", 2, "messages", "non-empty list"),
    ("chat-last-not-assistant", "chat", C + '{"messages": [{"role": "user", "content": "hi"}]}\n', None,
     "train", 2, "messages[0].role", "last message must be from 'assistant'"),
    ("chat-extra-key", "chat", C + '{"messages": [{"role": "assistant", "content": "a", "name": "x"}]}', None,
     "train", 2, "messages[0].name", "unknown field"),
    ("chat-content-type", "chat", C + '{"messages": [{"role": "assistant", "content": ["a"]}]}\n', None,
     "train", 2, "messages[0].content", "must be a string, got an array"),
    ("duplicates", "instruction", jsonl([ins(i) for i in range(8)] + [ins(2), ins(5)]), None,
     "train", 9, "instruction+input+output", "duplicate rate 0.2 exceeds validate.max_duplicate_rate 0.05"),
    ("train-eval-overlap", "instruction", jsonl([ins(i) for i in range(5)]),
     jsonl([ins(10), ins(3, output="a different answer"), ins(11)]),
     "eval", 2, "instruction+input", "overlap rate 0.333 exceeds validate.max_overlap_rate 0.0"),
    ("over-long-field", "instruction", G + json.dumps(ins(3, output="x" * 201)) + "\n", None,
     "train", 3, "output", "201 characters"),
    ("blank-line-inside", "instruction", jsonl([ins(1)]) + "\n" + jsonl([ins(2)]), None,
     "train", 2, None, "blank line"),
    ("two-trailing-newlines", "instruction", G + "\n", None, "train", 3, None, "blank line"),
    ("bom-not-at-start", "instruction", G + "\ufeff" + json.dumps(ins(3)) + "\n", None,
     "train", 3, None, "byte order mark"),
    ("duplicate-key", "instruction", G + '{"instruction": "a", "output": "b", "output": "c"}\n', None,
     "train", 3, None, "duplicate key 'output'"),
    ("nan", "instruction", G + '{"instruction": "a", "output": NaN}\n', None, "train", 3, None, "NaN"),
    ("lone-surrogate", "instruction", G + '{"instruction": "a", "output": "\\ud800"}\n', None,
     "train", 3, "output", "surrogate"),
    ("bad-eval-file", "instruction", G, '{"instruction": "a", "output": 1.5}\n',
     "eval", 1, "output", "got a number"),
]


@pytest.mark.parametrize(("fmt", "train", "eval", "file", "line", "field", "rule"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_data_names_file_line_field_and_writes_nothing(work, fmt, train, eval, file, line, field, rule):
    work.write(train, eval if eval is not None else jsonl([MAKERS[fmt](99)]))
    with pytest.raises(DataError) as info:
        run(work.params(fmt, max_chars_per_field=200))
    err, path = info.value, str(work.train if file == "train" else work.eval)
    assert (err.file, err.line, err.field) == (path, line, field)
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(err).startswith(where + (f"field '{field}': " if field else ""))
    assert rule in str(err)
    assert work.outputs() == []


def test_missing_file(work):
    work.write(G)
    with pytest.raises(DataError, match=r"eval\.jsonl: file not found"):
        run(work.params())
    with pytest.raises(DataError, match="file not found"):
        check_file(work.root / "nope.jsonl", "instruction", work.params().validate_)


def test_failed_run_keeps_earlier_good_outputs_untouched(work):
    work.write(jsonl([ins(i) for i in range(10)]), jsonl([ins(20)]))
    run(work.params())
    before = {p: p.read_bytes() for p in [*work.validated.iterdir(), work.report]}
    stamps = {p: p.stat().st_mtime_ns for p in before}
    for bad_train, bad_eval in [(G + "{oops\n", None), (jsonl([ins(i) for i in range(10)]), jsonl([ins(4)]))]:
        work.write(bad_train, bad_eval)
        with pytest.raises(DataError):
            run(work.params())
        assert {p: p.read_bytes() for p in before} == before
        assert {p: p.stat().st_mtime_ns for p in before} == stamps
    leftovers = [p.name for p in work.validated.parent.iterdir() if p.name != "validated"]
    assert leftovers == []  # no temp folder left beside the output


def test_gx_layer_maps_failures_to_line_and_field(work):
    """Records that skip check_file: the GX expectations alone still point at the line and field."""
    suite = Suite("chat", work.params(max_chars_per_field=10).validate_)
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 11}]}
    with pytest.raises(DataError) as info:
        suite.check("train", work.train, [chat(1), long], [1, 2])
    assert (info.value.line, info.value.field) == (2, "messages[1].content")
    assert "length 11 is outside 1..10" in str(info.value)


def test_cli_subprocess_bad_data_exits_1_with_the_error_line(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.jsonl").write_text(G + '{"instruction": "a", "output": 7}\n')
    (tmp_path / "raw" / "eval.jsonl").write_text(jsonl([ins(9)]))
    (tmp_path / "params.yaml").write_text(
        "reports_dir: reports\ndata:\n"
        "  train_path: raw/train.jsonl\n  eval_path: raw/eval.jsonl\n  validated_dir: data/validated\n")
    env = dict(os.environ) | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tasks", "validate", "--params", "params.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "error: raw/train.jsonl:3: field 'output': must be a string, got a number" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()
