"""Errors a person can act on: printed as one clear message, no traceback, exit code 1."""

from __future__ import annotations

from pathlib import Path


class TunelineError(Exception):
    """A failure with a message that says what is wrong and where."""


class DataError(TunelineError):
    """Bad input data: names the file, the line (1-based), the field and the rule broken."""

    def __init__(self, file: Path | str, line: int | None, field: str | None, rule: str):
        self.file, self.line, self.field, self.rule = str(file), line, field, rule
        where = self.file + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {'field ' + repr(field) + ': ' if field else ''}{rule}")
