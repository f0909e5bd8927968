"""Bad input, tried for real (issue 8): the corpus of tests/data/bad/, a few generated files, and bad params.

Every bad data file goes through `tuneline validate` and through a full `tuneline run --no-prefect` on a
project that already trained and registered a model; every bad param goes through the run (or, for the
model's own limits, through tokenize, the first stage that loads the model). Each must exit non-zero with
exactly one error line that names the file, line, field and rule (or the params key and rule), and leave
the project's data/, models/ and reports/ byte-identical and the MLflow registry as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from support.project import REPO, tiny_params
from typer.testing import CliRunner

from flows.cli import app
from tuneline import registry
from tuneline.config import Params

BAD = REPO / "tests" / "data" / "bad"
ROOT_RULE = "{key}resolves to {real}, outside the data root {root} (data.root; null: the current folder)"


class Case(NamedTuple):
    """One bad input: its files (None: the project's own good one) and the error after `error: `.

    `expected` may name {train}, {eval} (the paths as given), {real} (the named file, symlinks followed),
    {root} (the data root) and {key} (the params key of a path rule, with its space; empty for validate).
    """

    id: str
    fmt: str
    train: str | None
    eval: str | None
    expected: str


def case(name: str, expected: str, fmt: str = "instruction") -> Case:
    return Case(name.removesuffix(".jsonl"), fmt, name, None, "{train}" + expected)


CORPUS = [
    case("truncated_json.jsonl",
         ":3: invalid JSON at column 53: Unterminated string; the line ends early (truncated?)"),
    case("wrong_type_number.jsonl", ":3: field 'output': must be a string, got a number"),
    case("wrong_type_array.jsonl", ":3: field 'instruction': must be a string, got an array"),
    case("null_value.jsonl", ":3: field 'output': must be a string, got null"),
    case("missing_output.jsonl", ":3: field 'output': required field is missing"),
    case("missing_instruction.jsonl", ":3: field 'instruction': required field is missing"),
    case("extra_field.jsonl",
         ":3: field 'score': unknown field 'score'; format 'instruction' has instruction, input, output"),
    case("empty_output.jsonl", ":3: field 'output': must not be empty or whitespace-only"),
    case("whitespace_instruction.jsonl", ":3: field 'instruction': must not be empty or whitespace-only"),
    case("empty_file.jsonl", ": file has no records"),
    case("whitespace_only.jsonl", ": file has no records"),
    case("blank_line_inside.jsonl",
         ":2: blank line: JSON Lines has no empty records (only one final newline is allowed)"),
    case("bom_not_at_start.jsonl", ":3: UTF-8 byte order mark (BOM): accepted only at the start of line 1"),
    case("bom_then_bad_line.jsonl", ":2: field 'output': must be a string, got a boolean"),
    case("crlf_then_bad_line.jsonl", ":3: field 'output': must be a string, got a number"),
    case("cr_only_line_endings.jsonl", ":1: invalid JSON at column 94: Extra data; the line holds a lone CR "
                                       "(old Mac line ends?): end lines with LF or CRLF"),
    case("invalid_utf8.jsonl", ":3: not valid UTF-8 (byte 0xe9 at column 57); save the file as UTF-8"),
    case("nul_byte.jsonl", ":3: NUL byte at column 57: binary data, not JSON Lines text"),
    case("nul_escape.jsonl", ":3: field 'output': contains a NUL character (\\u0000)"),
    case("lone_surrogate.jsonl", ":3: field 'output': contains a lone surrogate escape: not valid Unicode"),
    case("not_an_object.jsonl", ":3: expected a JSON object, got an array"),
    case("json_array_file.jsonl", ":1: invalid JSON at column 2: Expecting value; one JSON value spread over "
                                  "several lines is not JSON Lines (one object per line)"),
    case("duplicate_key.jsonl", ":3: invalid JSON: duplicate key 'output' in one object"),
    case("nan_value.jsonl", ":3: invalid JSON: NaN is not JSON"),
    case("mixed_formats.jsonl",
         ":3: field 'messages': unknown field 'messages'; format 'instruction' has instruction, input, output"),
    case("duplicates_over_threshold.jsonl", ":9: field 'instruction+input+output': duplicate rate 0.2 exceeds "
         "validate.max_duplicate_rate 0.05; first duplicate at this line (repeats line 3)"),
    Case("overlap_pair", "instruction", "overlap_train.jsonl", "overlap_eval.jsonl",
         "{eval}:2: field 'instruction+input': train/eval overlap rate 0.333 exceeds validate.max_overlap_rate "
         "0.0; first overlap at this line (its prompt is also in {train} line 4)"),
    case("chat_bad_role.jsonl", ":2: field 'messages[0].role': must be one of system, user, assistant; got \"bot\"",
         "chat"),
    case("chat_empty_messages.jsonl", ":2: field 'messages': must be a non-empty list of {{role, content}} messages",
         "chat"),
    case("chat_last_not_assistant.jsonl",
         ":2: field 'messages[0].role': the last message must be from 'assistant', not 'user'", "chat"),
    case("chat_message_not_object.jsonl",
         ":2: field 'messages[0]': must be an object {{role, content}}, got a string", "chat"),
    case("chat_empty_content.jsonl", ":2: field 'messages[1].content': must not be empty or whitespace-only", "chat"),
    case("symlink_outside.jsonl", ": " + ROOT_RULE),  # -> /etc/passwd: refused before a byte of it is read
]
# Made by the `generated` fixture: too big to commit, or pointing outside a folder that only exists at test time.
GENERATED = [
    case("huge_record.jsonl", ":2: field 'output': is 5242880 characters long, over validate.max_chars_per_field "
                              "20000"),
    case("long_file.jsonl", ":99990: field 'output': must be a string, got a number"),
    case("symlink_to_outside_valid.jsonl", ": " + ROOT_RULE),
    Case("outside_path_as_eval", "instruction", None, "OUTSIDE", "{eval}: " + ROOT_RULE),
    Case("dotdot_path_escape", "instruction", "DOTDOT", None, "{train}: " + ROOT_RULE),
]
ACCEPTED = ["accepted_bom.jsonl", "accepted_crlf.jsonl"]  # by design: a leading BOM and CRLF line ends

runner = CliRunner()


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def snapshot(*folders: Path) -> dict[str, str]:
    """path -> sha256 of every file (a symlink: where it points) under the folders."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    """The generated bad files in one folder (`gen`), and a valid file in a folder beside it (`outside`)."""
    gen, outside = tmp_path_factory.mktemp("gen"), tmp_path_factory.mktemp("outside")
    good = {"instruction": "Which word is a fruit?", "input": "tiger mango piano", "output": "mango"}
    huge = {**good, "output": "x" * (5 << 20)}  # one 5 MiB record
    (gen / "huge_record.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(huge) + "\n", encoding="utf-8")
    with open(gen / "long_file.jsonl", "w", encoding="utf-8") as f:  # 100k distinct records, line 99990 bad
        for i in range(1, 100_001):
            f.write(json.dumps({**good, "input": f"tiger mango piano {i}", "output": 1 if i == 99_990 else "mango"})
                    + "\n")
    (outside / "outside.jsonl").write_text(json.dumps(good) + "\n", encoding="utf-8")  # valid: only its place is bad
    (gen / "symlink_to_outside_valid.jsonl").symlink_to(outside / "outside.jsonl")
    return {"gen": gen, "outside": outside / "outside.jsonl"}


def case_path(name: str | None, folder: Path, root: Path, generated: dict[str, Path]) -> Path | None:
    """A case's file name -> its path in `folder`; OUTSIDE and DOTDOT reach the valid file outside `root`."""
    if name == "OUTSIDE":
        return generated["outside"]
    if name == "DOTDOT":  # spelled from inside the data root, resolves beside it
        return root / ".." / generated["outside"].parent.name / generated["outside"].name
    return None if name is None else folder / name


def names_eval(c: Case) -> bool:
    return c.expected.startswith("{eval}")


def expected_line(c: Case, train: Path | None, eval: Path | None, root: Path, key: str) -> str:
    real = (eval if names_eval(c) else train).resolve()
    return "error: " + c.expected.format(train=train, eval=eval, root=root.resolve(), real=real, key=key)


# ---------------------------------------------------------------- tuneline validate PATH


def write_params(folder: Path, tree: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def validate_args(c: Case, folder: Path, generated: dict[str, Path], params: Path) -> tuple[list[str], Path, Path]:
    """`tuneline validate TRAIN [--eval EVAL]`, or the eval file alone, with `folder` as the data root."""
    train, eval = (case_path(n, folder, folder, generated) for n in (c.train, c.eval))
    paths = [str(train or eval)] + (["--eval", str(eval)] if train and eval else [])
    return ["validate", *paths, "--format", c.fmt, "--params", str(params)], train, eval


def root_case(c: Case) -> bool:
    """A file whose only fault is where it lies: pipeline runs refuse it (data.root), `tuneline validate` reads it."""
    return ROOT_RULE in c.expected


@pytest.mark.parametrize("c", [c for c in [*CORPUS, *GENERATED] if not root_case(c)], ids=lambda c: c.id)
def test_validate_cli_rejects_with_one_error_line(c, generated, tmp_path, monkeypatch):
    folder = BAD if c in CORPUS else generated["gen"]
    params = write_params(tmp_path / "cfg", {"data": {"root": str(folder)}})
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # anything written to a relative path would land here
    before = snapshot(folder, generated["outside"].parent)
    args, train, eval = validate_args(c, folder, generated, params)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [expected_line(c, train, eval, folder, "")]
    assert list(work.iterdir()) == [] and result.stdout == ""
    assert snapshot(folder, generated["outside"].parent) == before


@pytest.mark.parametrize("name", ACCEPTED)
def test_leading_bom_and_crlf_are_accepted_by_design(name, tmp_path):
    params = write_params(tmp_path, {"data": {"root": str(BAD)}})
    result = runner.invoke(app, ["validate", str(BAD / name), "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok: {BAD / name}: 2 instruction records\n"


def test_validate_cli_checks_files_outside_the_data_root(generated, tmp_path, monkeypatch):
    """data.root guards a pipeline run's params, not the files a person names: their content decides."""
    params = write_params(tmp_path / "cfg", {"data": {"root": str(tmp_path / "cfg")}})
    monkeypatch.chdir(tmp_path)
    outside = generated["outside"]
    result = runner.invoke(app, ["validate", str(outside), "--params", str(params)])
    assert result.exit_code == 0 and result.stdout == f"ok: {outside}: 1 instruction records\n"
    result = runner.invoke(app, ["validate", str(generated["gen"] / "symlink_to_outside_valid.jsonl")])
    assert result.exit_code == 0, result.output  # no params.yaml here: data.root null, the current folder
    bad = tmp_path / "elsewhere.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n', encoding="utf-8")
    result = runner.invoke(app, ["validate", str(bad), "--params", str(params)])
    assert result.exit_code == 1
    assert error_lines(result) == [f"error: {bad}:2: field 'output': must be a string, got a number"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg", "elsewhere.jsonl"]


def test_validate_subprocess_exit_code(tmp_path):
    """One real process: its exit status and stderr, not CliRunner's."""
    params = write_params(tmp_path / "cfg", {"data": {"root": str(BAD)}})
    work = tmp_path / "cwd"
    work.mkdir()
    bad = BAD / "wrong_type_number.jsonl"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(bad), "--params", str(params)],
                          cwd=work, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {bad}:3: field 'output': must be a string, got a number"]
    assert "Traceback" not in proc.stderr and list(work.iterdir()) == []


# ---------------------------------------------------------------- tuneline run: a project with a registered model


class Project(NamedTuple):
    root: Path
    params_file: Path
    params: Params

    def state(self) -> tuple[dict, tuple]:
        """Every byte under data/, models/, reports/, and the registry's versions and aliases."""
        c, name = registry.client(self.params), self.params.registry.model_name
        versions = sorted((str(v.version), v.run_id, v.source, v.status) for v in c.search_model_versions(
            f"name='{name}'"))
        files = snapshot(*(self.root / d for d in ("data", "models", "reports")))
        return files, (versions, dict(c.get_registered_model(name).aliases))

    def mlflow_runs(self) -> int:
        c = registry.client(self.params)
        return len(c.search_runs([c.get_experiment_by_name(self.params.registry.experiment).experiment_id]))


@pytest.fixture(scope="module")
def project(tiny_run, tmp_path_factory) -> Project:
    """A copy of the session's tiny project (trained, merged, version 1 registered), so failures here touch
    nothing that other modules read. Bootstrap keeps the shared project's section: its stamp matches, so the
    stage is skipped and writes nothing."""
    shared, _ = tiny_run
    src, root = shared.reports_dir.parent, tmp_path_factory.mktemp("project")
    for name in ("data", "models", "reports"):
        shutil.copytree(src / name, root / name, symlinks=True)
    shutil.copy2(src / "mlflow.db", root / "mlflow.db")
    # The gate can never promote here: a case that wrongly passed validate would stop at gate, not deploy.
    params = tiny_params(root, gate__max_perplexity=1e-6).model_copy(update={"bootstrap": shared.bootstrap})
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)), encoding="utf-8")
    assert params.data.root == root and registry.alias_version(params, registry.CHALLENGER) is not None
    return Project(root, params_file, params)


def run_args(c: Case, project: Project, generated: dict[str, Path]) -> tuple[list[str], Path, Path]:
    """`tuneline run` with the case's files copied into the project (outside data/: nothing there changes)."""
    incoming = project.root / "incoming"
    incoming.mkdir(exist_ok=True)
    train, eval = (case_path(n, incoming, project.root, generated) for n in (c.train, c.eval))
    for name, path in ((c.train, train), (c.eval, eval)):
        if path is not None and path.parent == incoming and not os.path.lexists(path):
            src = BAD / name if os.path.lexists(BAD / name) else generated["gen"] / name
            shutil.copy2(src, path, follow_symlinks=False)  # a symlink stays a symlink
    sets = [f"data.format={c.fmt}"] + [f"data.{k}_path={p}" for k, p in (("train", train), ("eval", eval)) if p]
    return ["run", "--no-prefect", "--params", str(project.params_file),
            *(arg for s in sets for arg in ("--set", s))], train, eval


@pytest.mark.parametrize("c", [*CORPUS, *GENERATED], ids=lambda c: c.id)
def test_full_run_rejects_and_changes_nothing(c, project, generated):
    before = project.state()
    args, train, eval = run_args(c, project, generated)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    key = "data.eval_path " if names_eval(c) else "data.train_path "
    assert error_lines(result) == [expected_line(c, train or project.params.data.train_path,
                                                 eval or project.params.data.eval_path, project.root, key)]
    assert project.state() == before


# ---------------------------------------------------------------- bad params


BAD_PARAMS = [
    ("train.learnig_rate=0.1", "train.learnig_rate: unknown key (check the spelling against params.yaml)"),
    ("train.batch_size=many",
     "train.batch_size: Input should be a valid integer, unable to parse string as an integer (got 'many')"),
    ("train.learning_rate=-0.001", "train.learning_rate: Input should be greater than 0 (got -0.001)"),
    ("lora.r=0", "lora.r: Input should be greater than 0 (got 0)"),
    ("lora.dropout=1.5", "lora.dropout: Input should be less than 1 (got 1.5)"),
    ("data.max_seq_length=4", "data.max_seq_length: Input should be greater than 8 (got 4)"),
]


@pytest.mark.parametrize(("setting", "rule"), BAD_PARAMS, ids=[s.split("=")[0] for s, _ in BAD_PARAMS])
def test_bad_params_stop_the_run_before_any_stage(setting, rule, project):
    before, runs = project.state(), project.mlflow_runs()
    result = runner.invoke(app, ["run", "--no-prefect", "--params", str(project.params_file), "--set", setting])
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [f"error: {project.params_file}: {rule}"]
    assert project.mlflow_runs() == runs  # it stopped before the pipeline's MLflow run was opened
    assert project.state() == before


def model_copy(project: Project, dest: Path) -> Path:
    shutil.copytree(project.root / "models" / "base", dest)
    return dest


def needs_custom_code(project: Project, dest: Path) -> Path:
    """The base model plus an auto_map to code that leaves a mark if it is ever imported."""
    folder = model_copy(project, dest)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("from pathlib import Path\nPath(__file__).with_name('ran').touch()\n")
    return folder


class _Mark:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):  # unpickling this creates the file: the proof that a pickle was loaded
        return open, (self.path, "w")


def pickle_weights_only(project: Project, dest: Path) -> Path:
    folder = model_copy(project, dest)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Mark(folder / "ran")))
    return folder


@pytest.mark.parametrize(("make", "setting", "rule"), [
    (None, "data.max_seq_length=257",
     "data.max_seq_length: 257 is above the base model's max_position_embeddings 256 ({base}/config.json); "
     "at most 256"),
    (None, "model.base={missing}",
     "model.base: no folder '{missing}', and it is no Hugging Face id (org/name)"),
    (needs_custom_code, "model.base={folder}",
     "model.trust_remote_code: is false, and {folder} needs code of its own ({folder}/config.json auto_map: "
     "AutoConfig, AutoModelForCausalLM); set it to true only if you trust that code"),
    (pickle_weights_only, "model.base={folder}",
     "model.base: {folder} has no *.safetensors weights, only pytorch_model.bin; only safetensors are loaded "
     "(pickled weights can run code): convert them with save_pretrained(..., safe_serialization=True)"),
], ids=["max_seq_length-above-model", "missing-model-path", "trust_remote_code-off", "pickle-weights-only"])
def test_bad_model_params_stop_tokenize_before_it_loads_anything(make, setting, rule, project, tmp_path):
    """The model's own limits need its config.json: tokenize, the first stage that loads the model, checks
    them first, reading only that file and the folder's file names; no weights load, no model code runs."""
    folder = make(project, tmp_path / "model") if make else None
    names = {"base": project.params.model.base, "missing": tmp_path / "no" / "model", "folder": folder}
    before = project.state()
    result = runner.invoke(app, ["stage", "tokenize", "--params", str(project.params_file),
                                 "--set", setting.format(**names)])
    assert result.exit_code == 1, result.output
    assert error_lines(result) == ["error: " + rule.format(**names)]
    assert project.state() == before
    assert folder is None or not (folder / "ran").exists()


def test_a_model_outside_model_root_is_refused(project, tmp_path):
    folder = model_copy(project, tmp_path / "model")
    before = project.state()
    result = runner.invoke(app, ["stage", "tokenize", "--params", str(project.params_file), "--set",
                                 f"model.base={folder}", "--set", f"model.root={project.root}"])
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [f"error: model.base: {folder} resolves to {folder.resolve()}, outside "
                                   f"model.root {project.root.resolve()}"]
    assert project.state() == before
