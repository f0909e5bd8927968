"""The generation engine: one model and its tokenizer behind a continuous-batching decoder.

No Ray here: `Engine` is a plain object that a Serve replica (serving/model_server.py) wraps, and that a
test or a benchmark can drive in-process. Where the model's files come from: serving/model_source.py. How
requests share the model: serving/decoding.py (continuous batching over serving/kv_cache.py's slots).

This layer is about text. `prepare` turns an API request into a `Job` (tokens, limits, sampling); `submit`
runs it, turning tokens into text as they come: incremental detokenization, the first stop string ends the
row, and a stream gets each piece of text as soon as it is certain (text that may still become a stop
string waits).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.api import APIError
from serving.decoding import Decoder
from serving.job import Job, ModelError
from serving.model_source import resolve_model
from tuneline.formats import render_prompt, stop_strings
from tuneline.models import encode_prompt

__all__ = ["Engine", "Job", "ModelError"]

PREFILL_TOKENS = {"cuda": 16384, "cpu": 2048}  # prompt tokens prefilled in one forward


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string in `text` begins, if any."""
    return min((text.index(s) for s in stops if s in text), default=None)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop string (or complete a multi-byte char)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class _Text:
    """A job's text, decoded incrementally (a few tokens at a time, not the whole answer at every token):
    finds its first stop string and feeds a stream."""

    def __init__(self, tokenizer, job: Job, emit: Callable[[str], None] | None):
        self.tokenizer, self.job, self.emit = tokenizer, job, emit
        self.text, self.sent = "", ""
        self.prefix = self.read = 0  # tokens before `prefix` are settled; those up to `read` are in `text`
        self.before = ""  # the decoded tokens[prefix:read]: they change only when the text grows

    def on_token(self, token: int) -> bool:
        tokens = self.job.tokens
        now = self.tokenizer.decode(tokens[self.prefix:], skip_special_tokens=False)
        if len(now) > len(self.before) and not now.endswith("\ufffd"):  # a whole character more
            checked = len(self.text)
            self.text += now[len(self.before):]
            self.prefix, self.read = self.read, len(tokens)
            self.before = self.tokenizer.decode(tokens[self.prefix:self.read], skip_special_tokens=False)
            stops = self.job.stops
            hit = any(self.text.find(s, max(0, checked - len(s) + 1)) >= 0 for s in stops)
            if self.emit is not None:
                cut = _first_stop(self.text, stops)
                safe = self.text[:cut] if cut is not None else self.text[:len(self.text) - _held_back(self.text, stops)]
                if len(safe) > len(self.sent):
                    self.emit(safe[len(self.sent):])
                    self.sent = safe
            return hit
        return False


class Engine:
    """One model and its tokenizer; `submit` runs a request, `generate` and `stream` wait for it."""

    def __init__(self, model: str, template: str, max_tokens_limit: int, max_prompt_tokens: int,
                 tracking_uri: str | None = None, dtype: str = "auto", threads: int | None = None,
                 max_batch_size: int = 8, graphs: bool | None = None, compile: bool = False,
                 compile_prefill: bool | None = None, freeze: bool = False, one_row: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.model_dir, self.source = resolve_model(model, tracking_uri)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            cuda_dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() \
                else torch.float16
            torch_dtype = cuda_dtype if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch_dtype, use_safetensors=True,
                                                          local_files_only=True).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.template, self.template_stops = template, stop_strings(template)
        self.max_tokens_limit, self.max_prompt_tokens = max_tokens_limit, max_prompt_tokens
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.dtype = str(torch_dtype).removeprefix("torch.")
        # A template the tokenizer cannot render fails the replica now, not every chat request later.
        render_prompt([{"role": "user", "content": "hi"}], template, self.tokenizer)
        length = max_prompt_tokens + max_tokens_limit
        self.decoder = Decoder(self.model, self.eos_ids, self.pad_id, slots=max_batch_size,
                               length=min(length, self.context) if self.context else length,
                               prefill_tokens=max(PREFILL_TOKENS[self.device.type], max_prompt_tokens),
                               graphs=graphs, compile=compile,
                               compile_prefill=compile if compile_prefill is None else compile_prefill,
                               freeze=freeze, one_row=one_row)
        self.decoder.warm_up()
        # What exists now (libraries, model, compiled code) lives as long as the engine. Left to the collector,
        # each full collection would scan it all, stalling every running request: 450,000 objects and 0.19 s a
        # collection on a CPU, 1.1 million and 0.65 s compiled (bench/gc_pause.py). Frozen, it is never scanned.
        gc.collect()
        gc.freeze()

    def info(self) -> dict:
        return {**self.source, "model_dir": str(self.model_dir), "device": str(self.device), "dtype": self.dtype,
                "kv_cache_bytes": self.decoder.forward.cache.bytes, "cuda_graphs": self.decoder.graphs_on}

    def prepare(self, spec: dict) -> Job:
        """Tokenize and check one request (a dict of serving.api.to_spec); APIError(400) if it cannot run."""
        if spec["kind"] == "chat":
            param = "messages"
            prompt = render_prompt(spec["messages"], self.template, self.tokenizer)
            ids = encode_prompt(self.tokenizer, prompt, self.template)  # as in training (tasks.tokenize)
        else:
            param = "prompt"
            ids = self.tokenizer(spec["prompt"])["input_ids"]
        max_tokens = spec["max_tokens"]
        if max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {self.max_tokens_limit}",
                           "max_tokens")
        if not ids:
            raise APIError(400, "the prompt is empty", param)
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of "
                           f"{self.max_prompt_tokens}", param)
        if self.context and len(ids) + max_tokens > self.context:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is over the "
                           f"model's context of {self.context} tokens", param)
        return Job(ids=ids, max_tokens=max_tokens, temperature=spec.get("temperature", 0.0),
                   top_p=spec.get("top_p", 1.0), stops=list(spec.get("stop") or []) + self.template_stops,
                   seed=spec.get("seed"), ignore_eos=bool(spec.get("ignore_eos")))

    def submit(self, job: Job, done: Callable[[dict | None, Exception | None], None],
               emit: Callable[[str], None] | None = None) -> Job:
        """Start `job`; `emit(text)` gets each certain piece of a stream, then `done(result, error)` is called
        once, on the decoding thread. A stream's pieces add up to the result's text."""
        text = _Text(self.tokenizer, job, emit)

        def on_end(reason: str, error: Exception | None) -> None:
            if error is not None:
                done(None, error)
                return
            result = self._result(job, reason)
            if emit is not None and result["text"].startswith(text.sent) and len(result["text"]) > len(text.sent):
                emit(result["text"][len(text.sent):])
            done(result, None)

        job.on_token, job.on_end = text.on_token, on_end
        return self.decoder.submit(job)

    def _result(self, job: Job, reason: str) -> dict:
        """The answer text up to its first stop string, why it ended, and its counts and times."""
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=False)
        cut = _first_stop(text, job.stops)
        if cut is not None:
            text, reason = text[:cut], "stop"
        end = time.perf_counter()
        first = job.first_token_at or end
        return {"text": text, "finish_reason": reason,
                "prompt_tokens": len(job.ids), "completion_tokens": len(job.tokens) + job.eos_seen,
                "batch_size": round(job.batch_rows / job.steps) if job.steps else 1,
                "generate_s": end - job.arrived, "ttft_s": first - job.arrived, "latency_s": end - job.arrived}

    def start(self, job: Job, emit: Callable[[str], None] | None = None) -> Future:
        """`submit`, with its result (or error) in a Future (`asyncio.wrap_future` awaits it)."""
        future: Future = Future()
        self.submit(job, lambda result, error: future.set_exception(error) if error is not None
                    else future.set_result(result), emit)
        return future

    def generate(self, jobs: list[Job]) -> list[dict]:
        """Run `jobs` together and wait for all; one result per job, in order (raises a job's error)."""
        return [future.result() for future in [self.start(job) for job in jobs]]

    def stream(self, job: Job, emit: Callable[[str], None]) -> dict:
        """Run one job, calling `emit` with each piece of its text from the decoding thread; its result."""
        return self.start(job, emit).result()

    def close(self) -> None:
        self.decoder.close()
        gc.unfreeze()  # what this engine held may be collected again (a process that builds another one)
