"""A function through torch.compile for a serving replica: compiled at start, never again while it serves.

Compiling a model's forward takes seconds on a CPU and minutes on a GPU (1B shape); a replica that compiled
in the middle of traffic would stall every running request that long. So the shapes to expect are compiled
at start (`warm`), with dynamic sizes; after that, a call that would compile again (a shape the warm-up
did not cover), or any failure of the compiled code, runs the plain function from then on, and says so
once in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx.experimental._config as shape_config

log = logging.getLogger(__name__)


class Compiled:
    """`fn` compiled with dynamic shapes; calls compile as needed until `warm()`, then never."""

    def __init__(self, fn: Callable[..., Any], what: str):
        self.plain, self.what = fn, what
        self.compiled: Callable[..., Any] | None = torch.compile(fn, dynamic=True)
        self.stance = "default"

    def warm(self) -> None:
        self.stance = "fail_on_recompile"

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.plain(*args)
        try:
            # No duck sizing: two sizes equal in the first call (rows and a model's head count, say) would
            # otherwise be compiled as equal, and every other size would compile again.
            with shape_config.patch(use_duck_shape=False), torch.compiler.set_stance(self.stance):
                return self.compiled(*args)
        except Exception:
            log.exception("the compiled %s failed or would compile again: running it plainly from now on", self.what)
            self.compiled = None
            return self.plain(*args)
