"""Stage 1, validate: strict JSON Lines checks, then a Great Expectations suite.

Two layers, each stopping at the first problem with a DataError that names the
file, the 1-based line and the field:
1. `check_file` reads each line strictly: encoding, JSON, the format's schema
   (`tuneline.formats.FIELDS`), chat rules, the length limit.
2. `_Suite` runs GX expectations over the parsed records: no nulls, string
   lengths, duplicate rate, train/eval overlap rate.

Two deliberate leniencies: CRLF line endings are accepted (the CR is
stripped), and a UTF-8 byte order mark is accepted and stripped at the very
start of line 1 only (where Windows tools put one); anywhere else it is an error.

A local data file that params name must lie inside the data root (`data.root`,
default the current folder), symlinks and '..' followed: params name data, not any
file the process can read. s3:// URIs are outside this rule (their cache copies are
ours), and so are the files a person names to `tuneline validate PATH`.

Only when everything passes are `data/validated/{train,eval}.jsonl` and
`reports/validation.json` written, atomically; a failure writes nothing.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tuneline import s3, tracking
from tuneline.atomic import atomic_dir, write_json
from tuneline.config import Params, Validate
from tuneline.errors import DataError
from tuneline.formats import CHAT_ROLES, FIELDS

BOM = b"\xef\xbb\xbf"
BLANK = "blank line: JSON Lines has no empty records (only one final newline is allowed)"
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
              int: "a number", float: "a number", type(None): "null"}
Bad = Callable[[str | None, str], DataError]  # (field, rule) -> the error for the current line


def _json_type(value: Any) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def _strict_object(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]  # json.loads keeps the last of two equal keys; we refuse to guess
    if len(set(keys)) < len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r} in one object")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; the standard does not


def _parse_line(raw: bytes, col0: int, bad: Bad) -> Any:
    if b"\x00" in raw:
        raise bad(None, f"NUL byte at column {raw.index(0) + 1 + col0}: binary data, not JSON Lines text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1 + col0}); "
                        "save the file as UTF-8") from None
    if text.startswith("\ufeff"):
        raise bad(None, "UTF-8 byte order mark (BOM): accepted only at the start of line 1")
    try:
        return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        ends_early = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        hint = ("; one JSON value spread over several lines is not JSON Lines (one object per line)"
                if text.strip() in ("[", "{") else
                "; the line holds a lone CR (old Mac line ends?): end lines with LF or CRLF" if "\r" in text else
                "; the line ends early (truncated?)" if ends_early else "")
        raise bad(None, f"invalid JSON at column {e.colno}: {e.msg.removesuffix(' starting at')}{hint}") from None
    except ValueError as e:  # from the two hooks above
        raise bad(None, f"invalid JSON: {e}") from None
    except RecursionError:
        raise bad(None, "invalid JSON: nested too deeply") from None


def _check_text(field: str, value: str, required: bool, cfg: Validate, bad: Bad) -> None:
    if required and not value.strip():
        raise bad(field, "must not be empty or whitespace-only")
    if len(value) > cfg.max_chars_per_field:
        raise bad(field, f"is {len(value)} characters long, over validate.max_chars_per_field "
                         f"{cfg.max_chars_per_field}")
    if "\x00" in value:
        raise bad(field, "contains a NUL character (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800" parses but cannot be written
        raise bad(field, "contains a lone surrogate escape: not valid Unicode") from None


def _check_messages(messages: list, cfg: Validate, bad: Bad) -> list[dict[str, str]]:
    if not messages:
        raise bad("messages", "must be a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(at, f"must be an object {{role, content}}, got {_json_type(m)}")
        extra = sorted(m.keys() - {"role", "content"})
        if extra:
            raise bad(f"{at}.{extra[0]}", "unknown field: a message has only role and content")
        for key in ("role", "content"):
            if key not in m:
                raise bad(f"{at}.{key}", "required field is missing")
        if not isinstance(m["role"], str) or m["role"] not in CHAT_ROLES:
            raise bad(f"{at}.role", f"must be one of {', '.join(CHAT_ROLES)}; got {json.dumps(m['role'])}")
        if not isinstance(m["content"], str):
            raise bad(f"{at}.content", f"must be a string, got {_json_type(m['content'])}")
        _check_text(f"{at}.content", m["content"], True, cfg, bad)
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":  # the last message is the answer that is trained on
        raise bad(f"messages[{len(out) - 1}].role", f"the last message must be from 'assistant', not "
                                                     f"'{out[-1]['role']}'")
    return out


def _check_record(obj: Any, fmt: str, cfg: Validate, bad: Bad) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise bad(None, f"expected a JSON object, got {_json_type(obj)}")
    spec = FIELDS[fmt]
    extra = [k for k in obj if k not in spec]
    if extra:
        raise bad(extra[0], f"unknown field{'s' * (len(extra) > 1)} {', '.join(map(repr, extra))}; "
                            f"format '{fmt}' has {', '.join(spec)}")
    out: dict[str, Any] = {}
    for name, (required, typ) in spec.items():
        if name not in obj:
            if required:
                raise bad(name, "required field is missing")
            out[name] = typ()  # optional fields default to empty: every validated record has one shape
            continue
        if not isinstance(obj[name], typ):
            raise bad(name, f"must be {JSON_TYPES[typ]}, got {_json_type(obj[name])}")
        if typ is str:
            _check_text(name, obj[name], required, cfg, bad)
        out[name] = obj[name]
    if fmt == "chat":
        out["messages"] = _check_messages(out["messages"], cfg, bad)
    if fmt == "preference" and out["chosen"].strip() == out["rejected"].strip():
        raise bad("rejected", "must differ from chosen: a pair that prefers an answer to itself teaches nothing")
    return out


def check_root(path: Path, root: Path | None, key: str | None = None) -> None:
    """DataError unless `path`, symlinks followed, lies inside `root` (None: the current folder)."""
    base, real = (root or Path.cwd()).resolve(), path.resolve()
    if not real.is_relative_to(base):
        raise DataError(path, None, None, f"{key + ' ' if key else ''}resolves to {real}, outside the data root "
                                          f"{base} (data.root; null: the current folder)")


def check_file(path: Path | str, fmt: str, cfg: Validate) -> list[dict[str, Any]]:
    """The records of a JSON Lines file, normalized to the format's fields; DataError on the first problem.

    Record i sits on line i + 1: blank lines are errors, so the numbering never drifts.
    """
    path = Path(path)
    if fmt not in FIELDS:
        raise DataError(path, None, None, f"unknown format {fmt!r}; formats are {', '.join(FIELDS)}")
    if not path.is_file():
        raise DataError(path, None, None, "not a regular file" if path.exists() else "file not found")
    records: list[dict[str, Any]] = []
    blank = None  # the first blank line: reported once we know whether the file has records at all
    with open(path, "rb") as f:  # bytes, so that bad UTF-8 is reported with its line
        for lineno, raw in enumerate(f, 1):
            raw, col0 = raw.removesuffix(b"\n").removesuffix(b"\r"), 0
            if lineno == 1 and raw.startswith(BOM):
                raw, col0 = raw[len(BOM):], len(BOM)
            if not raw.strip():
                blank = blank or lineno
                continue
            if blank:
                raise DataError(path, blank, None, BLANK)
            bad = partial(DataError, path, lineno)
            records.append(_check_record(_parse_line(raw, col0, bad), fmt, cfg, bad))
    if not records:
        raise DataError(path, None, None, "file has no records")
    if blank:
        raise DataError(path, blank, None, BLANK)
    return records


def _prompt_side(record: dict[str, Any], fmt: str) -> str:
    """What the model is asked, whitespace-collapsed and casefolded: the key of the overlap check."""
    if fmt == "instruction":
        parts = [record["instruction"], record["input"]]
    elif fmt == "chat":
        parts = [f"{m['role']}: {m['content']}" for m in record["messages"][:-1]]
    else:
        parts = [record["prompt"]]
    return json.dumps([" ".join(p.split()).casefold() for p in parts], ensure_ascii=False)


def _first_lines(keys: list[str], lines: list[int]) -> dict[str, int]:
    """key -> the first line that has it."""
    first: dict[str, int] = {}
    for key, line in zip(keys, lines, strict=True):
        first.setdefault(key, line)
    return first


class _Suite:
    """Great Expectations over one split: a records table (one row per line) and a texts table."""

    def __init__(self, fmt: str, cfg: Validate):
        os.environ["GX_ANALYTICS_ENABLED"] = "False"  # must precede the import: no usage reporting
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self.gxe, self.fmt, self.cfg = gxe, fmt, cfg
        # In memory only: no data-docs temp folder, no progress bars in the stage's output.
        config = DataContextConfig(progress_bars=ProgressBarsConfig(globally=False),
                                   store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False))
        context = gx.get_context(mode="ephemeral", project_config=config)
        self.source = context.data_sources.add_pandas("tuneline")

    def _validate(self, name: str, frame, exp) -> tuple[bool, int | None]:
        """(success, index label of the first unexpected row)."""
        whole = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        batch = whole.get_batch(batch_parameters={"dataframe": frame})
        res = batch.validate(exp, result_format={"result_format": "SUMMARY", "partial_unexpected_count": 1})
        return bool(res.success), min(res.result.get("partial_unexpected_index_list") or [None])

    def check(self, split: str, path: Path, records: list[dict], lines: list[int],
              train: tuple[Path, dict[str, int]] | None = None) -> dict[str, Any]:
        """Stats of one split; DataError on its first failed expectation. `train`: (path, prompt -> line)."""
        import pandas as pd

        fmt, cfg, gxe = self.fmt, self.cfg, self.gxe
        texts = []  # (line, field, text) for every string: one long table serves every format
        for line, r in zip(lines, records, strict=True):
            if fmt == "chat":
                texts += [(line, f"messages[{i}].content", m["content"]) for i, m in enumerate(r["messages"])]
            else:  # an empty optional field means "absent", not a too-short string
                texts += [(line, k, v) for k, v in r.items() if v or FIELDS[fmt][k][0]]
        texts = pd.DataFrame(texts, columns=["line", "field", "text"])
        required = [name for name, (req, _) in FIELDS[fmt].items() if req]
        recs = pd.DataFrame([{k: r[k] for k in required} for r in records], index=lines)
        # A duplicate repeats every field of an earlier record; an overlap repeats a train prompt.
        keys = [json.dumps(r, sort_keys=True) for r in records]
        seen = _first_lines(keys, lines)
        dups = {line: seen[k] for k, line in zip(keys, lines, strict=True) if seen[k] != line}
        recs["is_duplicate"] = [line in dups for line in lines]
        n = len(records)
        stats: dict[str, Any] = {"file": str(path), "records": n, "duplicates": len(dups),
                                 "duplicate_rate": round(len(dups) / n, 6)}
        lengths = texts.text.str.len().groupby(texts.field.str.replace(r"\[\d+\]", "", regex=True)).max()
        stats["max_chars"] = {field: int(m) for field, m in lengths.items()}
        suite = [(recs, gxe.ExpectColumnValuesToNotBeNull(column=k)) for k in required] + [
            (texts, gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1,
                                                            max_value=cfg.max_chars_per_field)),
            (recs, gxe.ExpectColumnValuesToBeInSet(column="is_duplicate", value_set=[False],
                                                   mostly=_mostly(cfg.max_duplicate_rate)))]
        if train is not None:
            prompts = [_prompt_side(r, fmt) for r in records]
            overlaps = {line: train[1][p] for p, line in zip(prompts, lines, strict=True) if p in train[1]}
            recs["in_train"] = [line in overlaps for line in lines]
            stats.update(overlapping=len(overlaps), overlap_rate=round(len(overlaps) / n, 6))
            suite.append((recs, gxe.ExpectColumnValuesToBeInSet(column="in_train", value_set=[False],
                                                                mostly=_mostly(cfg.max_overlap_rate))))
        stats["expectations"] = []
        for i, (frame, exp) in enumerate(suite):
            ok, row = self._validate(f"{split}_{i}", frame, exp)
            stats["expectations"].append({"split": split, "expectation": exp.expectation_type,
                                          "column": exp.column, "success": ok})
            if ok:
                continue
            if exp.column == "is_duplicate":
                raise DataError(path, row, "+".join(FIELDS[fmt]), (
                    f"duplicate rate {stats['duplicate_rate']:.3g} exceeds validate.max_duplicate_rate "
                    f"{cfg.max_duplicate_rate}; first duplicate at this line (repeats line {dups[row]})"))
            if exp.column == "in_train":
                raise DataError(path, row, PROMPT_FIELDS[fmt], (
                    f"train/eval overlap rate {stats['overlap_rate']:.3g} exceeds validate.max_overlap_rate "
                    f"{cfg.max_overlap_rate}; first overlap at this line (its prompt is also in {train[0]} "
                    f"line {overlaps[row]})"))
            if exp.column == "text":
                t = texts.loc[row]
                raise DataError(path, int(t.line), t.field, f"length {len(t.text or '')} is outside 1.."
                                f"{cfg.max_chars_per_field} (validate.max_chars_per_field)")
            raise DataError(path, row, exp.column, "is null")
        return stats


PROMPT_FIELDS = {"instruction": "instruction+input", "chat": "messages", "completion": "prompt", "preference": "prompt"}


def _mostly(max_rate: float) -> float:
    # GX passes when the share of expected rows >= mostly; the epsilon absorbs float error in 1 - rate.
    return max(0.0, 1.0 - max_rate - 1e-12)


def _hold_out(records: list[dict], fmt: str, fraction: float, seed: int) -> list[int] | None:
    """Sorted indices of a seeded eval hold-out; whole prompt groups move, so it never overlaps train."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(_prompt_side(r, fmt), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    want, held = max(1, round(len(records) * fraction)), []
    for group in order:
        if len(held) >= want:
            break
        held += group
    return sorted(held) if len(held) < len(records) else None  # None: too few distinct prompts


def _prompt_lines(records: list[dict], fmt: str, lines: list[int]) -> dict[str, int]:
    """prompt -> the first line that asks it: what the overlap check looks eval prompts up in."""
    return _first_lines([_prompt_side(r, fmt) for r in records], lines)


def validate_paths(paths: list[Path], fmt: str, cfg: Validate, eval_path: Path | None = None) -> dict[str, int]:
    """`tuneline validate PATH... [--eval EVAL]`: each file alone (line checks, lengths, duplicate rate), and
    EVAL against the one train PATH (overlap); writes nothing. Any file the user names is read: data.root
    guards what params hand a pipeline run, not what a person asks to have checked."""
    if eval_path is not None and len(paths) != 1:
        raise DataError(eval_path, None, None, "--eval: give exactly one train file to check it against")
    files = [Path(p) for p in [*paths, *([eval_path] if eval_path is not None else [])]]
    parsed = [(path, check_file(path, fmt, cfg)) for path in files]  # the cheap line checks of every file first
    suite = _Suite(fmt, cfg)
    for i, (path, records) in enumerate(parsed):
        train = None
        if eval_path is not None and i == len(parsed) - 1:
            train_path, train_records = parsed[0]
            train = (train_path, _prompt_lines(train_records, fmt, list(range(1, len(train_records) + 1))))
        suite.check(f"file{i}", path, records, list(range(1, len(records) + 1)), train=train)
    return {str(path): len(records) for path, records in parsed}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    passed = sum(e["success"] for e in report["expectations"])
    table = Table(title=f"validate ({report['format']}, eval: {report['eval_source']})",
                  caption=f"{passed}/{len(report['expectations'])} Great Expectations passed")
    for col in ("split", "file", "records", "dup rate", "overlap", "longest field"):
        table.add_column(col, overflow="fold")
    for split, s in report["splits"].items():
        field, chars = max(s["max_chars"].items(), key=lambda kv: kv[1])
        overlap = f"{s['overlap_rate']:.3g}" if "overlap_rate" in s else "-"
        table.add_row(split, s["file"], str(s["records"]), f"{s['duplicate_rate']:.3g}", overlap,
                      f"{field} {chars}")
    Console().print(table)


def run(params: Params) -> dict:
    """Validate train and eval (a seeded hold-out of train if data.eval_path is null); write both + report."""
    d, cfg = params.data, params.validate_
    for key, path in (("data.train_path", d.train_path), ("data.eval_path", d.eval_path)):
        if path is not None and not s3.is_remote(path):
            check_root(Path(path), d.root, key)
    # s3:// paths are read from their local copies (tuneline/s3.py); local paths stay as they are
    d = d.model_copy(update={"train_path": s3.local_path(d.train_path),
                             "eval_path": s3.local_path(d.eval_path)})
    train = check_file(d.train_path, d.format, cfg)
    evals = check_file(d.eval_path, d.format, cfg) if d.eval_path is not None else None
    suite = _Suite(d.format, cfg)
    train_lines = list(range(1, len(train) + 1))
    train_stats = suite.check("train", d.train_path, train, train_lines)  # duplicates over the whole file
    if evals is None:  # hold out from train; the eval lines keep their train-file line numbers
        held = _hold_out(train, d.format, d.eval_split, params.train.seed)
        if held is None:
            raise DataError(d.train_path, None, None, f"cannot hold out data.eval_split={d.eval_split}: "
                                                      "train needs at least two distinct prompts")
        eval_path, eval_lines, evals = d.train_path, [i + 1 for i in held], [train[i] for i in held]
        kept = sorted(set(range(len(train))) - set(held))
        train_lines, train = [i + 1 for i in kept], [train[i] for i in kept]
        source = f"hold-out of {d.eval_split} of train (seed {params.train.seed})"
    else:
        eval_path, eval_lines, source = d.eval_path, list(range(1, len(evals) + 1)), "file"
    prompts = _prompt_lines(train, d.format, train_lines)
    eval_stats = suite.check("eval", eval_path, evals, eval_lines, train=(d.train_path, prompts))
    train_stats["records"] = len(train)  # the records written; duplicate_rate stays the whole file's
    expectations = train_stats.pop("expectations") + eval_stats.pop("expectations")
    report = {"format": d.format, "eval_source": source, "limits": cfg.model_dump(mode="json"),
              "splits": {"train": train_stats, "eval": eval_stats},
              "duplicate_rate": train_stats["duplicate_rate"], "overlap_rate": eval_stats["overlap_rate"],
              "expectations": expectations, "success": all(e["success"] for e in expectations)}
    with atomic_dir(d.validated_dir) as tmp:  # the report is written inside: if it fails, the old dir stays
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "eval.jsonl", evals)
        write_json(params.report("validation.json"), report)
    _print_summary(report)
    summary = {"train_records": len(train), "eval_records": len(evals),
               "duplicate_rate": report["duplicate_rate"], "overlap_rate": report["overlap_rate"]}
    if os.environ.get(tracking.RUN_ID_ENV):  # only inside a pipeline run; otherwise MLflow is not touched
        import mlflow

        with tracking.pipeline_run(params):
            tracking.log_section_params(params, "data", "validate")
            mlflow.log_metrics({f"validate.{k}": float(v) for k, v in summary.items()})
    return summary
