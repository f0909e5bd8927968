"""The generation engine: one model and its tokenizer, batched and streamed generation.

No Ray here: `Engine` is a plain object that a Serve replica (serving/model_server.py) wraps, and that
a test or a benchmark can drive in-process. Where the model's files come from: serving/model_source.py.

Batching: the prompts of a batch are left-padded to one length and generated together up to
the largest max_tokens of the batch. Every row keeps its own sampling (temperature, top_p,
seed: one random generator per row, so a seeded request gets the same text whatever it was
batched with), its own stop strings and max_tokens (a finished row only pads while the
others go on), and is cut on its own afterwards.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from serving.api import APIError
from serving.model_source import resolve_model
from tuneline.formats import render_prompt, stop_strings
from tuneline.models import encode_prompt

# A temperature this low samples the argmax anyway, and dividing logits by it overflows to inf (NaN probabilities).
GREEDY_BELOW = 1e-4


class ModelError(RuntimeError):
    """The model itself failed (e.g. NaN logits from broken weights): a server error, not the client's."""


@dataclass
class Job:
    """One request, tokenized and checked: what a batch row needs."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    arrived: float = field(default_factory=time.perf_counter)


class _RowSampler(LogitsProcessor):
    """Per-row sampling inside one greedy `generate`: a sampling row draws its token from its own
    generator (temperature, top_p) and leaves only that token possible, so argmax picks it."""

    def __init__(self, jobs: list[Job], eos_ids: list[int]):
        self.jobs, self.eos_ids = jobs, eos_ids
        self.no_eos = [i for i, j in enumerate(jobs) if j.ignore_eos]
        self.generators: dict[int, torch.Generator] = {}
        self.first: float | None = None  # when the first token's logits were ready: time to first token

    def _generator(self, i: int, device) -> torch.Generator:
        if i not in self.generators:
            seed = self.jobs[i].seed
            self.generators[i] = torch.Generator(device=device).manual_seed(
                seed if seed is not None else random.getrandbits(63))
        return self.generators[i]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first is None:
            self.first = time.perf_counter()
        if torch.isnan(scores).any():
            raise ModelError("the model produced NaN logits: its weights are broken")
        if self.no_eos:
            rows = torch.tensor(self.no_eos, device=scores.device)[:, None]
            scores[rows, torch.tensor(self.eos_ids, device=scores.device)[None, :]] = -float("inf")
        for i, job in enumerate(self.jobs):
            if job.temperature < GREEDY_BELOW:
                continue
            probs = torch.softmax(scores[i].float() / job.temperature, dim=-1)
            if job.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                sorted_p[(sorted_p.cumsum(0) - sorted_p) > job.top_p] = 0  # keep the nucleus, and the token crossing it
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            token = torch.multinomial(probs, 1, generator=self._generator(i, scores.device))
            row = torch.full_like(scores[i], -float("inf"))
            row[token] = 0
            scores[i] = row
        return scores


class _RowStops(StoppingCriteria):
    """Ends each row on its own: at its max_tokens, its EOS, its first stop string, or on cancel.
    Records how many tokens each row generated (the finished rows then only pad)."""

    def __init__(self, tokenizer, jobs: list[Job], start: int, eos_ids: set[int], cancel: threading.Event | None):
        self.tokenizer, self.jobs, self.start, self.eos_ids, self.cancel = tokenizer, jobs, start, eos_ids, cancel
        self.done: list[int | None] = [None] * len(jobs)
        # A stop string ends in the newest token: decoding a tail this long is enough to find it.
        self.tails = [4 * max((len(s) for s in j.stops), default=0) + 4 for j in jobs]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[1] - self.start
        last = input_ids[:, -1].tolist()
        cancelled = self.cancel is not None and self.cancel.is_set()
        for i, job in enumerate(self.jobs):
            if self.done[i] is not None:
                continue
            if cancelled or n >= job.max_tokens or (last[i] in self.eos_ids and not job.ignore_eos):
                self.done[i] = n
            elif job.stops:
                tail = self.tokenizer.decode(input_ids[i, max(self.start, input_ids.shape[1] - self.tails[i]):],
                                             skip_special_tokens=False)
                if any(s in tail for s in job.stops):
                    self.done[i] = n
        return torch.tensor([d is not None for d in self.done], device=input_ids.device)


class _Streamer:
    """The `streamer` protocol of `generate`: the prompt first (skipped), then each new token."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_token(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop string (or complete a multi-byte char)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class Engine:
    """One model and its tokenizer; `generate` runs a batch, `stream` one request token by token."""

    def __init__(self, model: str, template: str, max_tokens_limit: int, max_prompt_tokens: int,
                 tracking_uri: str | None = None, dtype: str = "auto", threads: int | None = None):
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
        self.lock = threading.Lock()  # one generate at a time: batches and streams share the device
        # A template the tokenizer cannot render fails the replica now, not every chat request later.
        render_prompt([{"role": "user", "content": "hi"}], template, self.tokenizer)

    def info(self) -> dict:
        return {**self.source, "model_dir": str(self.model_dir), "device": str(self.device), "dtype": self.dtype}

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

    def generate(self, jobs: list[Job], streamer: _Streamer | None = None,
                 cancel: threading.Event | None = None) -> list[dict]:
        """Generate every job as one left-padded batch; one result dict per job, in order."""
        width = max(len(j.ids) for j in jobs)
        input_ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            input_ids[i, width - len(job.ids):] = torch.tensor(job.ids)
            mask[i, width - len(job.ids):] = 1
        sampler = _RowSampler(jobs, sorted(self.eos_ids))
        stops = _RowStops(self.tokenizer, jobs, width, self.eos_ids, cancel)
        with self.lock, torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max(j.max_tokens for j in jobs), do_sample=False, pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([sampler]), stopping_criteria=StoppingCriteriaList([stops]),
                streamer=streamer)
            end = time.perf_counter()
        rows = out[:, width:].tolist()
        results = []
        for i, job in enumerate(jobs):
            n = min(stops.done[i] if stops.done[i] is not None else len(rows[i]), job.max_tokens)
            text, finish = self._cut(rows[i][:n], job)
            results.append({"text": text, "finish_reason": finish, "prompt_tokens": len(job.ids),
                            "completion_tokens": n, "batch_size": len(jobs), "generate_s": end - start,
                            "ttft_s": (sampler.first or end) - job.arrived, "latency_s": end - job.arrived})
        return results

    def _cut(self, new_ids: list[int], job: Job) -> tuple[str, str]:
        """The answer text up to EOS or the first stop string, and why it ended."""
        at_eos = None if job.ignore_eos else next((i for i, t in enumerate(new_ids) if t in self.eos_ids), None)
        text = self.tokenizer.decode(new_ids[:at_eos], skip_special_tokens=False)
        cut = min((text.index(s) for s in job.stops if s in text), default=None)
        if cut is not None:
            return text[:cut], "stop"
        return text, "length" if at_eos is None else "stop"

    def stream(self, job: Job, emit: Callable[[str], None], cancel: threading.Event | None = None) -> dict:
        """Generate one job alone, calling `emit` with each new piece of text as soon as it is certain:
        text that might still turn into a stop string waits. Returns the same result as `generate`,
        whose text is exactly the concatenation of the pieces."""
        ids: list[int] = []
        sent = ""

        def on_token(token: int) -> None:
            nonlocal sent
            if token in self.eos_ids and not job.ignore_eos:
                return
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            cut = min((text.index(s) for s in job.stops if s in text), default=None)
            safe = text[:cut] if cut is not None else text[:len(text) - _held_back(text, job.stops)]
            if len(safe) > len(sent) and safe.startswith(sent):
                emit(safe[len(sent):])
                sent = safe

        result = self.generate([job], streamer=_Streamer(on_token), cancel=cancel)[0]
        if result["text"].startswith(sent) and len(result["text"]) > len(sent):
            emit(result["text"][len(sent):])
        return result
