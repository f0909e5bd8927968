"""CUDA graphs of the decoder's decode step (serving/forward.py's `pick`): captured once per (rows, attended length)
bucket, then replayed, so a step costs one launch rather than the hundreds of small kernels of an eager forward.
With serving.compile_decode the step captured is a torch.compile'd one: Inductor fuses the small kernels
(norms, rotary embeddings, activations), which otherwise take more of a step's device time than reading
the weights (bench/results/decode_profile_h200.txt: 1.47 ms against 2.44 ms a step, at one row).

A step of n running rows over positions up to L runs the graph of the smallest buckets holding them: rows
1 (2 when compiled), 2, 4, ... up to the cache's slots, lengths 128, 256, ... up to the cache's length. The
extra rows and positions are idle slots, masked out. The graphs share one memory pool: they never run at
once. Compiled, one compilation (dynamic shapes) serves every bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

GRAPH_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_GRAPH_LENGTH = 128
Outputs = tuple[torch.Tensor, ...]


def _bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


def _compiled(step: Callable[[int, int], Outputs], dynamic: bool | None, **config) -> Callable[[int, int], Outputs]:
    """`step` through torch.compile, each call under Inductor's `config` (read while it compiles). The config goes
    in as torch.compile's options too: Dynamo keeps compiled code by code object and reuses it under any backend
    that compares equal, and two backends differ only by their options."""
    compiled = torch.compile(step, dynamic=dynamic, options=config or None)
    if not config:
        return compiled

    def configured(n: int, length: int) -> Outputs:
        with torch._inductor.config.patch(**config):
            return compiled(n, length)

    return configured


# Dynamo reads the freezing flag while it traces (to make the weights graph constants), not only Inductor; a CPU
# fuses the products only with enable_concat_linear (a GPU always does).
FREEZING = {"freezing": True, "cpp.enable_concat_linear": True}


def _one_row(step: Callable[[int, int], Outputs]) -> Callable[[int, int], Outputs]:
    # Compiled for one row, a product of one row by a weight is a reduction Inductor generates and fuses with its
    # neighbours (a norm, the activation) where a dynamic row count leaves it to cuBLAS; coordinate-descent tuning
    # then sizes those reductions. The lengths become dynamic at the second one seen: two compilations in all.
    # `alone` is a code object of its own: Dynamo keeps by code object which sizes it has seen change, and the
    # step for any row count has seen many (it would compile this one dynamic in its rows from the start).
    def alone(n: int, length: int) -> Outputs:
        return step(n, length)

    return _compiled(alone, None, coordinate_descent_tuning=True)


class DecodeGraphs:
    """`step(n, length)` (a decode forward over rows 0..n-1 whose inputs live in fixed device buffers, returning
    its output tensors) captured per bucket. `on` turns False if the model cannot be captured: then steps run eagerly.
    `capture=False` (CPU): steps are bucketed the same way and run without graphs (what the tests check).
    `compile`: run `step` through torch.compile (dynamic shapes: one compilation serves the buckets), and fall
    back to the plain `step` if the compiled one fails. `freeze` (compiled): Inductor's freezing, which folds the
    weights in as constants and concatenates the projections that share an input (query, key and value; gate
    and up) into one matrix product each: fewer, larger kernels, for a copy of those weights in memory.
    `one_row` (compiled): steps of one row run a step compiled for one row alone (`_one_row`; on an H200 its
    graph took 1.14 ms against 1.50 ms, bench/results/decode_profile_h200.txt), for two more compilations. It is
    never frozen: frozen too, it served 457 tokens/s at concurrency 1 against 661 (an H100,
    bench/results/serve_h100.txt)."""

    def __init__(self, step: Callable[[int, int], Outputs], slots: int, length: int, capture: bool = True,
                 compile: bool = False, freeze: bool = False, one_row: bool = False):
        self.capture = capture
        self.step, self.fallback = (_compiled(step, True, **(FREEZING if freeze else {})), step) if compile \
            else (step, None)
        self.one = _one_row(step) if compile and one_row else None
        # torch.compile specializes a dimension of size 1 (it broadcasts), so one row would be a compilation of
        # its own; a step of two rows costs about what one does (the weights are read once either way).
        least = 2 if compile and slots > 1 and self.one is None else 1
        self.rows = [r for r in GRAPH_ROWS if least <= r < slots] + [slots]
        self.lengths = [n for n in (MIN_GRAPH_LENGTH << i for i in range(20)) if n < length] + [length]
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Outputs]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.on = True

    def bucket(self, rows: int, length: int) -> tuple[int, int]:
        return _bucket(rows, self.rows), _bucket(length, self.lengths)

    def run(self, n: int, length: int) -> Outputs:
        """One step of rows 0..n-1, without a graph."""
        return (self.one if n == 1 and self.one is not None else self.step)(n, length)

    def capture_all(self) -> None:
        if not self.capture:
            return
        for n in reversed(self.rows):  # largest first: the smaller ones fit in the pool they leave
            for length in reversed(self.lengths):
                if self.on:
                    self.get(n, length)

    def get(self, n: int, length: int) -> tuple[torch.cuda.CUDAGraph, Outputs] | None:
        """The graph for this bucket and its outputs (overwritten by each replay), captured on first use; None if
        it is not captured."""
        if not self.capture:
            return None
        if (n, length) not in self.graphs:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up runs (allocator, lazy inits) off the graph
                    for _ in range(2):
                        self.run(n, length)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    outputs = self.run(n, length)
            except Exception:
                if self.fallback is not None:
                    log.exception("the compiled decode step failed: capturing the plain one")
                    self.step, self.fallback, self.one = self.fallback, None, None
                    self.graphs.clear()
                    return self.get(n, length)
                log.exception("this model's decode step cannot be captured as a CUDA graph: decoding eagerly")
                self.on = False
                return None
            self.graphs[(n, length)] = (graph, outputs)
        return self.graphs[(n, length)]
