"""What is live on the GPU at a run's peak, grouped by the line that allocated it.

torch's allocator history (torch.cuda.memory._record_memory_history) keeps the last allocations and frees
with their Python stacks. Walked back from the snapshot's final state, it gives the set of blocks live at the
highest point, and each block's allocating line: for compiled code a line of Inductor's generated module
(printed with its source, which names the buffer and its shape).

    with memory_peak.recorded() as rec:
        run()        # calls memory_peak.train_starts() once the model is built
    print(memory_peak.report(rec["snapshot"]))

The history restarts when training starts, so the peak found is training's, not the model build's (the
benches build in float32, then cast); blocks allocated before then and freed later are reported together,
as "before training started"."""

from __future__ import annotations

import linecache
from collections import defaultdict
from contextlib import contextmanager

import torch

_recording = False


def _record(clear: bool = False) -> None:
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=1_000_000,
                                             clear_history=clear)


@contextmanager
def recorded():
    global _recording
    out: dict = {}
    _record()
    _recording = True
    try:
        yield out
    finally:
        out["snapshot"] = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        _recording = False


def train_starts() -> None:
    """Forget the history so far, if recording: the peak searched for is training's."""
    if _recording:
        _record(clear=True)


BEFORE = [{"filename": "<before training started: the model and its adapter>", "line": 0, "name": ""}]


def site(frames: list[dict]) -> str:
    """The innermost frame outside torch's own package (the model, a library's kernel or a generated module),
    and whether torch.compile was compiling then (its autotuning allocates too)."""
    if frames is BEFORE:
        return BEFORE[0]["filename"]
    inner = frames[0]["filename"] if frames else ""
    compiling = " (while compiling)" if "/_inductor/" in inner or "/_dynamo/" in inner else ""
    for f in frames:
        if "/torch/" not in f["filename"] and not f["filename"].startswith("<"):
            source = linecache.getline(f["filename"], f["line"]).strip()
            where = f["filename"].split("site-packages/")[-1]
            return f"{where}:{f['line']} {f['name']}{compiling}  | {source[:110]}"
    return "(no Python frame: the autograd engine or C++)" if not frames else f"torch: {frames[0]['name']}"


def live_at_peak(snapshot: dict, device: int = 0) -> tuple[int, dict[int, tuple[int, list]], int]:
    """(peak bytes, {address: (size, allocating frames)} at the peak, events walked) for one device."""
    trace = snapshot["device_traces"][device]
    end = {b["address"]: (b["size"], b.get("frames", []))
           for seg in snapshot["segments"] if seg["device"] == device
           for b in seg["blocks"] if b["state"] == "active_allocated"}
    live = {addr: size for addr, (size, _) in end.items()}
    total = peak = sum(live.values())
    peak_at, peak_live = len(trace), dict(live)
    for i in range(len(trace) - 1, -1, -1):  # undo event i: the state before it
        e = trace[i]
        if e["action"] == "alloc":
            total -= live.pop(e["addr"], e["size"])
        elif e["action"] == "free_requested":
            live[e["addr"]] = e["size"]
            total += e["size"]
        if total > peak:
            peak, peak_at, peak_live = total, i, dict(live)
    frames: dict[int, list] = {}
    for e in reversed(trace[:peak_at]):  # each live block's allocation is the last alloc at its address before the peak
        if e["action"] == "alloc" and e["addr"] in peak_live and e["addr"] not in frames:
            frames[e["addr"]] = e["frames"]
    freed_after = {e["addr"] for e in trace[peak_at:] if e["action"] == "free_requested"}
    for addr in peak_live.keys() - frames.keys():  # allocated before the trace's window
        kept = addr in end and addr not in freed_after
        frames[addr] = end[addr][1] if kept else BEFORE
    return peak, {addr: (size, frames[addr]) for addr, size in peak_live.items()}, len(trace)


def report(snapshot: dict, top: int = 25) -> str:
    peak, live, events = live_at_peak(snapshot)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, frames in live.values():
        g = groups[site(frames)]
        g[0] += size
        g[1] += 1
    lines = [f"live at the peak: {peak / 2**30:.2f} GiB in {len(live)} blocks ({events} events recorded)"]
    for key, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {size / 2**30:7.3f} GiB  {count:5d}  {key}")
    return "\n".join(lines)
