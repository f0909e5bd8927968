"""Where a decode step's time goes on this machine: the device's share and the host's, per part.

Builds the serve bench's model (random-init Llama-3.2-1B shape, bf16), then prints
- the cost of the CUDA calls a step makes on this host: a tiny kernel launch, an event record and
  synchronize, a pinned host-to-device copy;
- a decode graph's replay time (device) for a few (rows, length) buckets: of the compiled step the engine
  captures (unless --no-compile), of the plain step, with --frozen of the compiled step with Inductor's
  freezing (query/key/value and gate/up fused into one product each), with --one-row of the compiled step whose
  one-row steps are compiled for one row alone (serving/cuda_graphs.py), and the plain step without a graph;
- the device time of one decode step by kernel (no graph, so that each kernel is seen), of the compiled
  step and of the plain one, at two rows and at 32: where the time goes that a graph does not remove
  (matrix-vector products, attention, small kernels);
- one request at a time, one token each, over prompts of different lengths: the time to first token;
- the engine at concurrency 1 and 32 (greedy, 128 tokens, the bench's prompts), host time per step in
  each part of the decoder loop (and in the garbage collector, gc0-gc2 by generation), at pipeline depth 1 and 2.

    python bench/decode_profile.py [--no-compile] [--frozen] [--one-row]
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import serve_bench as sb  # noqa: E402 - the same model and prompts

from serving import decoding, forward  # noqa: E402
from serving.cuda_graphs import DecodeGraphs  # noqa: E402


def per_call_us(fn, n: int = 2000) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / n


def cuda_calls() -> None:
    x = torch.zeros(16, device="cuda")
    pinned = torch.zeros(16, dtype=torch.long, pin_memory=True)
    dev = torch.zeros(16, dtype=torch.long, device="cuda")

    def record_sync():
        e = torch.cuda.Event()
        e.record()
        e.synchronize()

    print(f"launch {per_call_us(lambda: x.add_(1)):.1f} us, event record+sync {per_call_us(record_sync):.1f} us, "
          f"pinned H2D {per_call_us(lambda: dev.copy_(pinned, non_blocking=True)):.1f} us, "
          f"D2H pinned {per_call_us(lambda: pinned.copy_(dev, non_blocking=True)):.1f} us", flush=True)


def timed(acc: collections.Counter, name: str, owner=decoding.Decoder) -> None:
    f = getattr(owner, name)

    def g(self, *a, **k):
        t = time.perf_counter()
        try:
            return f(self, *a, **k)
        finally:
            acc[name] += time.perf_counter() - t

    setattr(owner, name, g)


def gc_timer(acc: collections.Counter) -> None:
    """Time the garbage collector's pauses into `acc` (gc0, gc1, gc2: by generation)."""
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            acc[f"gc{info['generation']}"] += time.perf_counter() - started[0]

    gc.callbacks.append(callback)


def candidate(d, name: str, freeze: bool = False, one_row: bool = False) -> DecodeGraphs:
    """The engine's decode step compiled anew: with Inductor's freezing, or with a step of one row compiled for one
    row alone. Its graphs are captured as the buckets are first timed."""
    graphs = DecodeGraphs(d.forward.pick, d.slots, d.length, compile=True, freeze=freeze, one_row=one_row)
    start = time.perf_counter()
    graphs.get(*graphs.bucket(1, 512))
    print(f"{name} step compiled and captured in {time.perf_counter() - start:.1f} s, "
          f"compiled: {graphs.fallback is not None}", flush=True)
    return graphs


def step_times(d, graphs: list[tuple[str, DecodeGraphs, tuple[int, ...]]]) -> None:
    for n, length in [(1, 512), (8, 512), (32, 512), (128, 512)]:
        replay = {name: per_call_us(g.get(n, length)[0].replay, 200) for name, g, _ in graphs}
        eager = per_call_us(lambda n=n, length=length: d.forward.pick(n, length), 20)
        print(f"rows {n:>3} length {length}: graph of the " + ", of the ".join(
            f"{name} step {us:8.1f} us" for name, us in replay.items()) + f", no graph {eager:8.1f} us", flush=True)


def kernels(step, name: str, n: int, length: int, steps: int = 10) -> None:
    """Device time per decode step by kernel: `step(n, length)` run without a graph, so each kernel is seen."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step(n, length)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(n, length)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / steps
    print(f"{name} step, rows {n} length {length}: kernels {sum(e.count for e in events) / steps:.0f} a step, "
          f"device {total:.1f} us a step; the largest:", flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"  {e.self_device_time_total / steps:8.1f} us {e.count / steps:5.0f}x  {e.key[:100]}", flush=True)


def first_tokens(engine, texts: list[str]) -> None:
    """Requests of one token, one at a time, over 16 of the bench's prompts: their lengths vary, and so do the
    prefill's shapes."""
    times = []
    for text in texts[:16]:
        job = engine.prepare({"kind": "completion", "prompt": text, "max_tokens": 1, "temperature": 0.0,
                              "ignore_eos": True})
        start = time.perf_counter()
        engine.generate([job])
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    print(f"one-token requests, 16 prompts of varying length: ms p50 {times[8]:.1f}, max {times[-1]:.1f}, "
          f"min {times[0]:.1f}", flush=True)


def main() -> None:
    from serving.generation import Engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="plain decode step only (saves the minutes of compiling a 1B model)")
    parser.add_argument("--frozen", action="store_true",
                        help="also the compiled step with Inductor's freezing (fused projections), side by side")
    parser.add_argument("--one-row", action="store_true",
                        help="also the step with one row compiled for one row alone (serving/cuda_graphs.py)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="decode-profile-"))
    model_dir = sb.build_model("llama-1b", tmp / "model")
    texts = sb.prompts(64, 200)
    cuda_calls()
    start = time.perf_counter()
    engine = Engine(str(model_dir), "alpaca", 128, 512, max_batch_size=128, compile=args.compile)
    d = engine.decoder
    print(f"engine ready in {time.perf_counter() - start:.1f} s (compile and capture), graphs on: {d.graphs_on}, "
          f"compiled: {d.graphs.fallback is not None}", flush=True)
    # (name, graphs, the rows its kernels are profiled at): the compiled steps' least bucket is two rows
    graphs = [("compiled", d.graphs, (2, 32)), ("plain", DecodeGraphs(d.forward.pick, d.slots, d.length), (2, 32))] \
        if args.compile else [("plain", d.graphs, (2, 32))]
    with torch.inference_mode():
        if args.frozen:
            graphs.append(("frozen", candidate(d, "frozen", freeze=True), (2, 32)))
        if args.one_row:
            graphs.append(("one-row", candidate(d, "one-row", one_row=True), (1, 2)))
        step_times(d, graphs)
        for name, g, rows in graphs:  # the plain graphs' step is forward.pick itself
            for n in rows:
                kernels(g.run, name, n, 512)
    del graphs  # the extra graphs' memory, before the engine runs

    first_tokens(engine, texts)
    acc: collections.Counter = collections.Counter()
    for name in ["_finish", "_decode", "_record", "_prefill", "_admit"]:
        timed(acc, name)
    timed(acc, "sample", forward.Forward)
    gc_timer(acc)
    for depth in (1, 2):
        d.depth = depth
        for c in (1, 32):
            jobs = [engine.prepare({"kind": "completion", "prompt": texts[i], "max_tokens": 128, "temperature": 0.0,
                                    "ignore_eos": True}) for i in range(c)]
            engine.generate(jobs)  # warm
            jobs = [engine.prepare({"kind": "completion", "prompt": texts[i], "max_tokens": 128, "temperature": 0.0,
                                    "ignore_eos": True}) for i in range(c)]
            acc.clear()
            steps = d.steps
            start = time.perf_counter()
            engine.generate(jobs)
            wall = time.perf_counter() - start
            n = d.steps - steps
            print(f"depth {depth} c={c:<3} {n} steps, {1000 * wall / n:.3f} ms/step, {c * 128 / wall:.0f} tok/s; "
                  f"host ms/step: " + ", ".join(f"{k} {1000 * v / n:.3f}" for k, v in sorted(acc.items())), flush=True)
    engine.close()


if __name__ == "__main__":
    main()
