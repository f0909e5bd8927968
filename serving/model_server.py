"""The model replica deployment: `ModelServer`, one model behind a continuous-batching engine, and its streams.

`ModelServer` loads one model (a folder or an MLflow URI such as `models:/NAME@champion`, fetched
inside the replica) into a serving/generation.py `Engine`. Every request, plain or streamed, joins the
engine's running batch as soon as a slot is free (up to `max_batch_size` at once) and leaves it when it
ends; a request whose client goes away is cancelled at the next step. Its options (replicas,
autoscaling, GPUs) are set where it is bound: serving/builders.py.
"""

import asyncio

from ray import serve
from ray.serve.metrics import Counter, Histogram

from serving.api import APIError

# A model replica reserves one CPU and uses one thread: the threads of several replicas would
# otherwise fight over the same cores. The router does only I/O and reserves none.
REPLICA_CPUS = 1
DRAIN_TIMEOUT_S = 120.0  # a stopping replica finishes its requests (and streams) for up to this long
# A model that fails to load (corrupt weights, wrong format) fails the same way again, so a new version's
# deployment is DEPLOY_FAILED after one failed replica start (downloads retry inside it: serving/model_source.py).
MODEL_CONSTRUCTOR_RETRIES = 1


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
                  max_constructor_retry_count=MODEL_CONSTRUCTOR_RETRIES)
class ModelServer:
    """One model: every request, plain or streamed, runs in the engine's continuous batch."""

    compiles_prefill = True  # with compile_decode (serving/forward.py)

    def __init__(self, model: str, template: str, max_tokens_limit: int, max_prompt_tokens: int,
                 tracking_uri: str | None, max_batch_size: int, compile_decode: bool = False):
        from serving.generation import Engine  # torch and transformers load in the replica, not in the router

        self.engine = Engine(model, template, max_tokens_limit, max_prompt_tokens, tracking_uri,
                             threads=REPLICA_CPUS, max_batch_size=max_batch_size, compile=compile_decode,
                             compile_prefill=compile_decode and self.compiles_prefill, one_row=compile_decode)
        self.max_batch_size = max_batch_size
        self.cancelled = 0
        self.tags = {"model_version": str(self.engine.source.get("version") or "")}
        self.batch_sizes = Histogram("tuneline_batch_size", "mean running batch over a request's decode steps",
                                     boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("model_version",))
        self.tokens = Counter("tuneline_generated_tokens", "completion tokens generated", tag_keys=("model_version",))
        self.speed = Histogram("tuneline_request_tokens_per_s", "completion tokens per second of one request",
                               boundaries=[1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                               tag_keys=("model_version",))

    def info(self) -> dict:
        return {**self.engine.info(), "max_batch_size": self.max_batch_size}

    def stats(self) -> dict:
        """What this replica has seen: requests cancelled because their client went away."""
        return {"cancelled": self.cancelled}

    async def _prepare(self, spec: dict):
        """The engine's Job for a request; AdapterServer (serving/adapters.py) also puts its adapter in place."""
        return self.engine.prepare(spec)

    async def _start(self, spec: dict, emit=None):
        """Prepare and submit; returns the job and an asyncio future of its result."""
        job = await self._prepare(spec)
        return job, asyncio.wrap_future(self.engine.start(job, emit))

    async def _finish(self, job, future) -> dict:
        """The job's result, or {"error"} when the model failed; cancels the job if this request is cancelled."""
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancel()
            self.cancelled += 1
            raise
        except Exception as e:  # the model failed (NaN logits, out of memory): this request says so
            return {"error": APIError(500, f"the model failed: {type(e).__name__}: {str(e)[-500:]}",
                                      code="model_error").to_dict()}
        self._observe(result)
        return result

    async def generate(self, spec: dict) -> dict:
        """One request (serving.api.to_spec); a result dict, or {"error": ...}."""
        try:
            job, future = await self._start(spec)
        except APIError as e:
            return {"error": e.to_dict()}
        return await self._finish(job, future)

    def _observe(self, result: dict) -> None:
        self.batch_sizes.observe(result["batch_size"], tags=self.tags)
        self.tokens.inc(result["completion_tokens"], tags=self.tags)
        if result["generate_s"] > 0:
            self.speed.observe(result["completion_tokens"] / result["generate_s"], tags=self.tags)

    async def stream(self, spec: dict):
        """Yields {"error"} or {"prompt_tokens"} first, then {"text"} pieces, then {"final": result}. Pieces that
        arrive while the consumer is busy go out together as one."""
        loop = asyncio.get_running_loop()
        pieces: list[str] = []
        ready = asyncio.Event()

        def arrived(text: str) -> None:
            pieces.append(text)
            ready.set()

        try:
            job, future = await self._start(spec, emit=lambda text: loop.call_soon_threadsafe(arrived, text))
        except APIError as e:
            yield {"error": e.to_dict()}
            return
        yield {"prompt_tokens": len(job.ids)}
        future.add_done_callback(lambda _: ready.set())
        ended = False
        try:
            while True:
                await ready.wait()
                ready.clear()
                if pieces:
                    text = "".join(pieces)
                    pieces.clear()
                    yield {"text": text}
                if future.done() and not pieces:
                    break
            ended = True
            final = await self._finish(job, future)
            if "error" in final:  # the stream has begun: the router says so in it (serving/router.py)
                raise RuntimeError(final["error"]["message"])
            yield {"final": final}
        finally:
            if not ended:  # the client went away (the generator was closed): free the row
                job.cancel()
                self.cancelled += 1


MODEL_DEPLOYMENT = ModelServer.name  # Serve's name for the deployment, as its logs and status show it
