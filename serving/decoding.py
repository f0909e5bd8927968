"""Continuous batching: requests join and leave the running batch at every step.

`Decoder` owns a model, its slot cache (serving/kv_cache.py) and one background thread. `submit` queues a
`Job`; the thread loops:

1. admit: waiting jobs take free slots and are prefilled together (right-padded, up to a token budget);
   their first tokens are sampled at once (time to first token).
2. decode: one token for every running row in one forward. On a GPU that forward is a CUDA graph,
   captured once per (rows, attended length) bucket and replayed, so a step costs one launch rather than
   hundreds of small ones.
3. finish the previous step: its tokens reach the host while this step runs on the device (the host work
   of a step, stop checks and streaming, overlaps the next one). A row that ended computes one token
   more, which is dropped; its slot is free for the next admission.

Token-level ends (max_tokens, EOS) are decided here; everything about text (stop strings, streaming) is
the job's `on_token`, which serving/generation.py supplies. Per-row sampling: serving/sampling.py.

Rows whose model is an adapter (serving/adapters.py) run eagerly, one forward per adapter in the batch;
`activate(key)` puts an adapter in place before its rows' forward.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from serving.kv_cache import ATTENTION, SlotCache, decode_mask
from serving.sampling import Rows, choose

log = logging.getLogger(__name__)

GRAPH_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # decode graphs are captured for these row counts
MIN_GRAPH_LENGTH = 128  # and for attended lengths of 128, 256, ... up to the cache's


class ModelError(RuntimeError):
    """The model itself failed (e.g. NaN logits from broken weights): a server error, not the client's."""


@dataclass(eq=False)
class Job:
    """One request, tokenized and checked: what a running row needs. `on_token(token)` returns True when the
    text is complete (a stop string); `on_end(reason, error)` is called once, from the decoding thread."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    adapter: str | None = None  # the adapter key (serving/adapters.py); None: the model itself
    arrived: float = field(default_factory=time.perf_counter)
    on_token: Callable[[int], bool] = lambda token: False
    on_end: Callable[[str, Exception | None], None] = lambda reason, error: None
    cancelled: bool = False
    # Filled in while it runs:
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    ended: bool = False
    batch_rows: int = 0  # summed over its steps: its mean batch is batch_rows / steps
    steps: int = 0
    eos_seen: int = 0  # 1 if it ended on EOS: the EOS token counts as generated, though not in `tokens`
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """The client went away: the row stops at the next step (no more tokens, `on_end("cancelled")`)."""
        self.cancelled = True


def _bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


class Decoder:
    """The batch loop over one model; `submit` from any thread. `graphs`: replay CUDA graphs for decode steps
    (on a GPU, when no adapter is in use)."""

    def __init__(self, model, eos_ids: set[int], pad_id: int, slots: int, length: int, prefill_tokens: int,
                 graphs: bool | None = None):
        self.model, self.eos_ids, self.pad_id = model, sorted(eos_ids), pad_id
        self.device = next(model.parameters()).device
        model.set_attn_implementation(ATTENTION)
        dtype = next(model.parameters()).dtype
        self.cache = SlotCache(model.config, slots, length, dtype, self.device)
        self.slots, self.length, self.prefill_tokens = slots, length, prefill_tokens
        self.cuda = self.device.type == "cuda"
        self.graphs_on = self.cuda if graphs is None else graphs and self.cuda
        self.row_buckets = [r for r in GRAPH_ROWS if r < slots] + [slots]
        self.length_buckets = [n for n in (MIN_GRAPH_LENGTH << i for i in range(20)) if n < length] + [length]
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
        # Device-side inputs of a decode step: each slot's next token and its position.
        self.next_ids = torch.full((slots,), pad_id, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.ban_eos = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.eos = torch.tensor(self.eos_ids, device=self.device)
        self.host_positions = [torch.zeros(slots, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.host_tokens: list[torch.Tensor] = []  # free host buffers for a step's tokens (pinned on a GPU)
        self.depth = 1 if self.cuda else 0  # steps left in flight while the host reads the one before
        self.pos = np.zeros(slots, dtype=np.int64)  # host copy: where each slot's next token goes
        self.free = list(range(slots))  # a heap: running rows stay in the lowest slots
        self.running: dict[int, Job] = {}
        self.waiting: deque[Job] = deque()
        self.records: deque = deque()  # launched steps whose tokens the host has not read yet
        self.commands: list[tuple[Callable[[], None], str | None, threading.Event]] = []
        self.activate: Callable[[str | None], None] | None = None
        self.cv = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="decoder", daemon=True)
        self.thread.start()

    # ----------------------------------------------------------------------------- from other threads

    def submit(self, job: Job) -> Job:
        with self.cv:
            if self.closed:
                raise RuntimeError("the decoder is closed")
            self.waiting.append(job)
            self.cv.notify()
        return job

    def call(self, fn: Callable[[], None], unless_in_use: str | None = None, wait: bool = True) -> None:
        """Run `fn` on the decoding thread between two steps (to change the model: adapters), once no running
        or waiting row uses the adapter `unless_in_use`. `wait`: block until it ran, re-raising its error."""
        done = threading.Event()
        box: list = []

        def run() -> None:
            try:
                fn()
            except Exception as e:
                box.append(e)
                if not wait:
                    log.exception("a deferred model change failed")
            finally:
                done.set()

        with self.cv:
            self.commands.append((run, unless_in_use, done))
            self.cv.notify()
        if wait:
            done.wait()
            if box:
                raise box[0]

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=30)

    def warm_up(self) -> None:
        """Capture every decode graph now (a second or so), rather than stalling the first requests of each size."""
        if self.graphs_on:
            self.call(lambda: [self._graph(r, n) for r in reversed(self.row_buckets)
                               for n in reversed(self.length_buckets) if self.graphs_on])

    # ------------------------------------------------------------------------------ the decoding thread

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
        for adapter, group in _by_adapter(admitted):
            self._use(adapter)
            slots = [s for s, _ in group]
            width = max(len(j.ids) for _, j in group)
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            for i, (slot, job) in enumerate(group):
                self.running[slot] = job  # from now on a failure ends it with the others (_fail_all)
                self.pos[slot] = len(job.ids)
                ids[i, :len(job.ids)] = torch.tensor(job.ids)
                job.generator = torch.Generator(self.device).manual_seed(
                    job.seed if job.seed is not None else random.getrandbits(63))
            slot_t = torch.tensor(slots, device=self.device)
            ids = ids.to(self.device, non_blocking=True)
            self.cache.prefill(slot_t)
            hidden = self.model.get_decoder()(input_ids=ids, cache=self.cache, use_cache=True,
                                              position_ids=torch.arange(width, device=self.device)[None]
                                              ).last_hidden_state
            last = torch.tensor([len(j.ids) - 1 for _, j in group], device=self.device)
            logits = self.model.get_output_embeddings()(hidden[torch.arange(len(group), device=self.device), last])
            self.ban_eos[slot_t] = torch.tensor([j.ignore_eos for _, j in group], device=self.device)
            tokens = choose(logits, Rows([j for _, j in group], self.ban_eos[slot_t], self.eos))
            self.next_ids[slot_t] = tokens.clamp(min=0)
            self._record(tokens, [(i, s, j) for i, (s, j) in enumerate(group)])

    def _decode(self) -> None:
        rows = sorted(self.running.items())
        adapters = {j.adapter for _, j in rows}
        slots = np.fromiter((s for s, _ in rows), dtype=np.int64, count=len(rows))
        top = int(slots[-1]) + 1
        longest = int(self.pos[slots].max()) + 1
        graphed = self.graphs_on and adapters == {None}
        n = _bucket(top, self.row_buckets) if graphed else top
        length = _bucket(longest, self.length_buckets) if graphed else longest
        host = self.host_positions[self.steps % 2]  # the other one may still be copying to the device
        view = host.numpy()
        view[:n] = 0
        view[slots] = self.pos[slots]
        self.pos[slots] += 1
        self.positions[:n].copy_(host[:n], non_blocking=True)
        captured = self._graph(n, length) if graphed else None
        if captured is not None:
            graph, logits = captured
            graph.replay()
        elif len(adapters) == 1:
            self._use(next(iter(adapters)))
            logits = self._step(n, length)
        else:  # rows of several adapters: one forward per adapter, over its own slots
            logits = None
            for adapter, group in _by_adapter(rows):
                self._use(adapter)
                index = torch.tensor([s for s, _ in group], device=self.device)
                part = self._step(len(group), length, index)
                if logits is None:
                    logits = part.new_zeros((n, part.shape[-1]))
                logits[index] = part
        jobs: list[Job | None] = [None] * n
        for slot, job in rows:
            jobs[slot] = job
            job.batch_rows += len(rows)
            job.steps += 1
        tokens = choose(logits, Rows(jobs, self.ban_eos[:n], self.eos))
        self.next_ids[:n] = tokens.clamp(min=0)
        self.steps += 1
        self._record(tokens, [(s, s, j) for s, j in rows])

    def _step(self, n: int, length: int, slots: torch.Tensor | None = None) -> torch.Tensor:
        """One decode forward: logits [rows, vocab] of rows 0..n-1 (or of `slots`) at their positions."""
        index = slice(None, n) if slots is None else slots
        positions = self.positions[index]
        self.cache.decode(n, positions, length, slots)
        out = self.model(input_ids=self.next_ids[index][:, None], position_ids=positions[:, None],
                         attention_mask=decode_mask(positions, length), cache=self.cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def _graph(self, n: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """The decode graph for `n` rows over `length` positions, captured on first use; None if this model
        cannot be captured (then every step runs eagerly)."""
        if (n, length) not in self.graphs:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up runs (allocator, lazy inits) off the graph
                    for _ in range(2):
                        self._step(n, length)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    logits = self._step(n, length)
            except Exception:
                log.exception("this model's decode step cannot be captured as a CUDA graph: decoding eagerly")
                self.graphs_on = False
                return None
            self.graphs[(n, length)] = (graph, logits)
        return self.graphs[(n, length)]

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


def _by_adapter(rows: list[tuple[int, Job]]) -> list[tuple[str | None, list[tuple[int, Job]]]]:
    groups: dict[str | None, list[tuple[int, Job]]] = {}
    for slot, job in rows:
        groups.setdefault(job.adapter, []).append((slot, job))
    return list(groups.items())
