"""serving/compiled.py: a replica compiles at start, never while it serves."""

from __future__ import annotations

import logging

import torch

from serving.compiled import Compiled


def scaled_rows(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(dim=1)


def test_after_warm_up_a_new_shape_runs_compiled_and_a_recompile_runs_plainly(caplog):
    fn = Compiled(scaled_rows, "test step")
    for rows in (1, 3):  # the warm-up: one row, and several
        fn(torch.ones(rows, 4))
    fn.warm()
    assert fn(torch.ones(7, 5)).tolist() == [10.0] * 7 and fn.compiled is not None  # dynamic: no compile
    with caplog.at_level(logging.ERROR, logger="serving.compiled"):
        out = fn(torch.ones(2, 3, dtype=torch.float64))  # a dtype the warm-up did not see: would compile again
    assert out.tolist() == [6.0, 6.0] and out.dtype == torch.float64
    assert fn.compiled is None and "running it plainly from now on" in caplog.text
    assert fn(torch.ones(1, 2)).tolist() == [4.0]
