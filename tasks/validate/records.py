"""Strict JSON Lines reading: each line's encoding, JSON, the format's schema, chat rules, the length limit.

`check_file` stops at the first problem with a DataError that names the file, the 1-based line and
the field. The schema is `tuneline.formats.FIELDS`; every record comes back normalized to it.

Two deliberate leniencies: CRLF line endings are accepted (the CR is
stripped), and a UTF-8 byte order mark is accepted and stripped at the very
start of line 1 only (where Windows tools put one); anywhere else it is an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tuneline.config import Validate
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
