"""Errors a person can act on: printed as one clear message, no traceback, exit code 1."""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path


class TunelineError(Exception):
    """A failure with a message that says what is wrong and where."""


class DataError(TunelineError):
    """Bad input data: names the file, the line (1-based), the field and the rule broken."""

    def __init__(self, file: Path | str, line: int | None, field: str | None, rule: str):
        self.file, self.line, self.field, self.rule = str(file), line, field, rule
        where = self.file + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {'field ' + repr(field) + ': ' if field else ''}{rule}")


# What "out of room" looks like from a write: disk full, quota exceeded, file-size limit (RLIMIT_FSIZE).
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class OutOfSpace(TunelineError):
    """Writing an output ran out of room; names the output."""


def os_errno(e: BaseException) -> int | None:
    """The OS error number of a failed I/O call, also when a Rust library (safetensors) reports it as text."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e))
    return int(found.group(1)) if found else None


def raise_if_out_of_space(e: BaseException, path: Path | str) -> None:
    """Raise OutOfSpace (from e) when e is a write that ran out of room while writing `path`."""
    code = os_errno(e)
    if code in NO_SPACE:
        raise OutOfSpace(f"{path}: {os.strerror(code)} while writing it; nothing was written there (a previous "
                         "version stays as it was). Free space on that filesystem (or raise the quota or file-size "
                         "limit) and run again.") from e


def guarded(fn: Callable[[], object]) -> int:
    """Run fn; a TunelineError, or running out of disk space anywhere, becomes one line on stderr and exit code 1."""
    try:
        fn()
    except TunelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if os_errno(e) not in NO_SPACE:
            raise
        print(f"error: out of disk space (or over a quota or file-size limit): {e}. Free space and run again; "
              "outputs are replaced by renames, so the previous ones are unchanged.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: outputs of the interrupted stage were not written", file=sys.stderr)
        return 130
    return 0

