"""bench/memory_peak.py: the blocks live at the highest point of an allocator history, by allocating line."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import memory_peak  # noqa: E402 - a bench helper, beside the benches


def at(line: int) -> list[dict]:
    return [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": "/x/site-packages/model.py", "line": line, "name": "forward"}]


def alloc(addr, size, line):
    return {"action": "alloc", "addr": addr, "size": size, "frames": at(line)}


def free(addr, size):
    return {"action": "free_requested", "addr": addr, "size": size, "frames": []}


def snapshot(trace, live_at_end):
    blocks = [{"address": a, "size": s, "state": "active_allocated", "frames": at(line)} for a, s, line in live_at_end]
    return {"segments": [{"device": 0, "blocks": blocks}], "device_traces": [trace]}


def test_the_peak_is_found_walking_back_from_the_final_state():
    # before the trace: block 9 (still live) and block 7 (freed inside it); address 2 is reused
    trace = [alloc(1, 100, 10), alloc(2, 50, 20), free(2, 50), alloc(2, 70, 30), alloc(3, 30, 40),
             free(3, 30), free(7, 1000), free(2, 70)]
    peak, live, events = memory_peak.live_at_peak(snapshot(trace, [(1, 100, 10), (9, 5, 90)]))
    assert (peak, events) == (1000 + 100 + 70 + 30 + 5, 8)
    assert {a: s for a, (s, _) in live.items()} == {1: 100, 2: 70, 3: 30, 7: 1000, 9: 5}
    assert live[2][1] == at(30)  # the reused address's latest allocation before the peak, not its first
    assert live[9][1] == at(90) and live[7][1] is memory_peak.BEFORE


def test_the_report_groups_by_the_first_line_outside_torch():
    trace = [alloc(1, 2**30, 10), alloc(2, 2**30, 10), alloc(3, 2**29, 20), free(3, 2**29)]
    text = memory_peak.report(snapshot(trace, [(1, 2**30, 10), (2, 2**30, 10)]))
    lines = text.splitlines()
    assert lines[0].startswith("live at the peak: 2.50 GiB in 3 blocks")
    assert "2.000 GiB" in lines[1] and "model.py:10 forward" in lines[1] and "    2  " in lines[1]
    assert "0.500 GiB" in lines[2] and "model.py:20 forward" in lines[2]
