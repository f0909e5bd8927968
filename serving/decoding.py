"""Continuous batching: requests join and leave the running batch at every step.

`Decoder` owns the model's forwards over its slot cache (serving/forward.py) and a thread that loops:
1. admit: waiting jobs take free slots and are prefilled together (right-padded, up to a token budget);
   their first tokens are sampled at once.
2. decode: one token for every running row in one forward; on a GPU a replayed CUDA graph
   (serving/cuda_graphs.py) that also picks the greedy tokens.
3. finish the step before: its tokens reach the host while this one runs on the device, so the host
   work (stop checks, streaming) overlaps it. A row that ended computes one token more, dropped.

Token-level ends (max_tokens, EOS) are decided here; text (stop strings, streaming) is the job's
`on_token` (serving/generation.py). Rows of adapters (serving/adapters.py) run eagerly, one forward per
adapter among them, after `activate(key)` puts it in place.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from serving.cuda_graphs import DecodeGraphs
from serving.forward import Forward
from serving.job import Job, ModelError, by_adapter

log = logging.getLogger(__name__)


class Decoder:
    """The batch loop over one model; `submit` from any thread. `graphs` (default: on a GPU): decode steps in
    CUDA graphs, when no adapter is in use. `compile`: the graphs' step is torch.compile'd (dynamic shapes:
    one compilation serves every bucket; on a GPU minutes at start, serving.compile_decode);
    `compile_prefill`: the prefill too (serving/forward.py). `freeze`: the compiled step with Inductor's freezing
    (fused projections, serving/cuda_graphs.py; measured by bench/serve_bench.py --compile frozen). `one_row`: a step of
    one row compiled for one row alone (serving/cuda_graphs.py; measured by --compile one-row)."""

    def __init__(self, model, eos_ids: set[int], pad_id: int, slots: int, length: int, prefill_tokens: int,
                 graphs: bool | None = None, compile: bool = False, compile_prefill: bool = False,
                 freeze: bool = False, one_row: bool = False):
        self.eos_ids, self.pad_id = sorted(eos_ids), pad_id
        self.forward = Forward(model, slots, length, pad_id, self.eos_ids, compile=compile_prefill)
        self.device = self.forward.device
        self.slots, self.length, self.prefill_tokens = slots, length, prefill_tokens
        self.cuda = self.device.type == "cuda"
        use = self.cuda if graphs is None else graphs  # on a CPU, graphs=True only buckets the steps (tests)
        self.graphs = DecodeGraphs(self.forward.pick, slots, length, capture=self.cuda, compile=compile,
                                   freeze=freeze, one_row=one_row) \
            if use else None
        self.host_positions = [torch.zeros(slots, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.host_tokens: list[torch.Tensor] = []  # free host buffers for a step's tokens (pinned on a GPU)
        self.depth = 1 if self.cuda else 0  # steps left in flight while the host reads the one before
        self.pos = np.zeros(slots, dtype=np.int64)  # host copy: where each slot's next token goes
        self.free = list(range(slots))  # a heap: running rows stay in the lowest slots
        self.running: dict[int, Job] = {}
        self.waiting: deque[Job] = deque()
        self.records: deque = deque()  # launched steps whose tokens the host has not read yet
        self.commands: list[tuple[Callable[[], None], str | None]] = []
        self.activate: Callable[[str | None], None] | None = None
        self.cv = threading.Condition()
        self.closed = False
        self.steps = self.prefills = 0  # decode steps and prefill forwards run so far
        self.thread = threading.Thread(target=self._loop, name="decoder", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        with self.cv:
            if self.closed:
                raise RuntimeError("the decoder is closed")
            self.waiting.append(job)
            self.cv.notify()
        return job

    def call(self, fn: Callable[[], Any], unless_in_use: str | None = None, wait: bool = True) -> Any:
        """Run `fn` on the decoding thread between two steps (to change the model: adapters), once no running
        or waiting row uses the adapter `unless_in_use`. `wait`: block until it ran; its result or error."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)
                if not wait:
                    log.exception("a deferred model change failed")

        with self.cv:
            self.commands.append((run, unless_in_use))
            self.cv.notify()
        return future.result() if wait else None

    def close(self) -> None:
        """Stop the thread; requests still running or waiting end with an error."""
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=30)
        self._fail_all(RuntimeError("the engine was closed"))

    @property
    def graphs_on(self) -> bool:
        return self.graphs is not None and self.graphs.on and self.graphs.capture

    def warm_up(self) -> None:
        """Compile the prefill and capture (and compile) every decode step now, not during the first requests."""
        self.call(self.forward.warm_up)
        if self.graphs is not None:
            self.call(self.graphs.capture_all)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cv:
                    while not (self.closed or self.waiting or self.running or self.commands or self.records):
                        self.cv.wait()
                    if self.closed:
                        break
                    commands = self._runnable_commands()
                    admitted = self._admit()
                for run in commands:
                    run()
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self.running:
                        self._decode()
                    while len(self.records) > (self.depth if self.running else 0):
                        self._finish(self.records.popleft())
                except Exception as e:  # the model failed (out of memory, a kernel error): every row says so
                    log.exception("decoding failed")
                    self._fail_all(e)

    def _runnable_commands(self) -> list[Callable[[], None]]:
        in_use = {j.adapter for j in self.running.values()} | {j.adapter for j in self.waiting}
        ready = [c for c in self.commands if c[1] is None or c[1] not in in_use]
        self.commands = [c for c in self.commands if c not in ready]
        return [c[0] for c in ready]

    def _admit(self) -> list[tuple[int, Job]]:
        """Waiting jobs that get a slot now: as many as there are free slots and the prefill budget allows."""
        while self.waiting and self.waiting[0].cancelled:
            self._end(self.waiting.popleft(), "cancelled")
        admitted: list[tuple[int, Job]] = []
        longest = 0
        while self.waiting and self.free:
            job = self.waiting[0]
            longest = max(longest, len(job.ids))
            if admitted and longest * (len(admitted) + 1) > self.prefill_tokens:
                break
            admitted.append((heapq.heappop(self.free), self.waiting.popleft()))
        return admitted

    def _prefill(self, admitted: list[tuple[int, Job]]) -> None:
        for adapter, group in by_adapter(admitted):
            self._use(adapter)
            width = max(len(j.ids) for _, j in group)
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            for i, (slot, job) in enumerate(group):
                self.running[slot] = job  # from now on a failure ends it with the others (_fail_all)
                self.pos[slot] = len(job.ids)
                ids[i, :len(job.ids)] = torch.tensor(job.ids)
                job.generator = torch.Generator(self.device).manual_seed(
                    job.seed if job.seed is not None else random.getrandbits(63))
            jobs = [j for _, j in group]
            tokens = self.forward.prefill(ids, [len(j.ids) for j in jobs], [s for s, _ in group],
                                          [j.ignore_eos for j in jobs], jobs)
            self.prefills += 1
            self._record(tokens, [(i, s, j) for i, (s, j) in enumerate(group)])

    def _decode(self) -> None:
        rows = sorted(self.running.items())
        adapters = {j.adapter for _, j in rows}
        slots = np.fromiter((s for s, _ in rows), dtype=np.int64, count=len(rows))
        top = int(slots[-1]) + 1
        longest = int(self.pos[slots].max()) + 1
        graphed = self.graphs is not None and self.graphs.on and adapters == {None}
        n, length = self.graphs.bucket(top, longest) if graphed else (top, longest)
        host = self.host_positions[self.steps % 2]  # the other one may still be copying to the device
        view = host.numpy()
        view[:n] = 0
        view[slots] = self.pos[slots]
        self.pos[slots] += 1
        self.forward.positions[:n].copy_(host[:n], non_blocking=True)
        captured = self.graphs.get(n, length) if graphed else None
        if captured is not None:
            graph, (logits, tokens) = captured
            graph.replay()
        elif len(adapters) == 1:
            self._use(next(iter(adapters)))
            logits, tokens = (self.graphs.run if graphed else self.forward.pick)(n, length)
        else:  # rows of several adapters: one forward per adapter, over its own slots
            logits = None
            for adapter, group in by_adapter(rows):
                self._use(adapter)
                index = torch.tensor([s for s, _ in group], device=self.device)
                part = self.forward.step(len(group), length, index)
                if logits is None:
                    logits = part.new_zeros((n, part.shape[-1]))
                logits[index] = part
            tokens = self.forward.greedy(logits, slice(None, n))
        jobs: list[Job | None] = [None] * n
        for slot, job in rows:
            jobs[slot] = job
            job.batch_rows += len(rows)
            job.steps += 1
        tokens = self.forward.sample(logits, tokens, jobs, slice(None, n))
        self.steps += 1
        self._record(tokens, [(s, s, j) for s, j in rows])

    def _use(self, adapter: str | None) -> None:
        if self.activate is not None:
            self.activate(adapter)

    def _record(self, tokens: torch.Tensor, rows: list[tuple[int, int, Job]]) -> None:
        """Queue the host copy of a step's tokens; `rows`: (index in tokens, slot, job)."""
        host = self.host_tokens.pop() if self.host_tokens else torch.zeros(self.slots, dtype=torch.long,
                                                                              pin_memory=self.cuda)
        host[:tokens.shape[0]].copy_(tokens, non_blocking=self.cuda)
        event = torch.cuda.Event() if self.cuda else None
        if event is not None:
            event.record()
        self.records.append((host, event, rows))

    def _finish(self, record) -> None:
        """The host side of a step: each row's token, its end, its slot freed."""
        host, event, rows = record
        if event is not None:
            event.synchronize()
        tokens = host.tolist()
        self.host_tokens.append(host)
        now = time.perf_counter()
        for i, slot, job in rows:
            if job.ended:
                continue
            token = tokens[i]
            if job.cancelled:
                self._release(slot, job, "cancelled")
            elif token < 0:
                self._release(slot, job, "error", ModelError("the model produced NaN logits: its weights are broken"))
            else:
                if job.first_token_at is None:
                    job.first_token_at = now
                eos = token in self.eos_ids and not job.ignore_eos
                if not eos:
                    job.tokens.append(token)
                if eos:
                    job.eos_seen = 1
                    self._release(slot, job, "stop")
                elif job.on_token(token):
                    self._release(slot, job, "stop")
                elif len(job.tokens) >= job.max_tokens:
                    self._release(slot, job, "length")

    def _release(self, slot: int, job: Job, reason: str, error: Exception | None = None) -> None:
        if self.running.get(slot) is job:
            del self.running[slot]
            heapq.heappush(self.free, slot)
        self._end(job, reason, error)

    def _end(self, job: Job, reason: str, error: Exception | None = None) -> None:
        job.ended = True
        try:
            job.on_end(reason, error)
        except Exception:
            log.exception("a request's end callback failed")

    def _fail_all(self, error: Exception) -> None:
        self.records.clear()
        for slot, job in list(self.running.items()):
            self._release(slot, job, "error", error)
        with self.cv:
            waiting, self.waiting = list(self.waiting), deque()
        for job in waiting:
            self._end(job, "error", error)
