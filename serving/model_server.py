"""The model replica deployment: `ModelServer`, one model behind Serve's batcher, and its streams.

`ModelServer` loads one model (a folder or an MLflow URI such as `models:/NAME@champion`, fetched
inside the replica) into a serving/generation.py `Engine`, batches concurrent requests with
`@serve.batch` (streams bypass the batcher) and records batch sizes and token rates. Its options
(replicas, autoscaling, GPUs) are set where it is bound: serving/builders.py.
"""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

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
    """One model: batched generation for plain requests, token streaming for `stream` requests."""

    def __init__(self, model: str, template: str, max_tokens_limit: int, max_prompt_tokens: int,
                 tracking_uri: str | None, max_batch_size: int, batch_wait_timeout_s: float):
        from serving.generation import Engine  # torch and transformers load in the replica, not in the router

        self.engine = Engine(model, template, max_tokens_limit, max_prompt_tokens, tracking_uri,
                             threads=REPLICA_CPUS)
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="generate")  # they queue on one lock
        # Ray's batcher forms the next batch while one runs (it waits only batch_wait_timeout_s), so under
        # load it would cut a queue of small batches. Requests wait here instead until the model is free,
        # then all of them enter the batcher together and form one full batch.
        self.model_free = asyncio.Event()
        self.model_free.set()
        self.tags = {"model_version": str(self.engine.source.get("version") or "")}
        self.batch_sizes = Histogram("tuneline_batch_size", "requests per generated batch",
                                     boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model_version",))
        self.tokens = Counter("tuneline_generated_tokens", "completion tokens generated", tag_keys=("model_version",))
        self.speed = Histogram("tuneline_batch_tokens_per_s", "completion tokens per second of one generate call",
                               boundaries=[1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                               tag_keys=("model_version",))

    def info(self) -> dict:
        return {**self.engine.info(), "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s}

    async def generate(self, spec: dict) -> dict:
        """One request (serving.api.to_spec) through the batcher; a result dict, or {"error": ...}."""
        try:
            job = self.engine.prepare(spec)
        except APIError as e:
            return {"error": e.to_dict()}
        await self.model_free.wait()
        return await self._batched(job)

    async def _run(self, work, *args):
        """An Engine call on the model's threads; AdapterServer (serving/adapters.py) puts the request's adapter
        in place first."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)

    @serve.batch  # its size and wait are set in __init__, from the serving config
    async def _batched(self, jobs: list) -> list[dict]:
        self.model_free.clear()
        try:
            results = await self._run(self.engine.generate, jobs)
        except Exception as e:  # the model failed (NaN logits, out of memory): every request of the batch says so
            error = APIError(500, f"the model failed: {type(e).__name__}: {str(e)[-500:]}", code="model_error")
            return [{"error": error.to_dict()} for _ in jobs]
        finally:
            self.model_free.set()
        self._observe(results)
        return results

    def _observe(self, results: list[dict]) -> None:
        tokens = sum(r["completion_tokens"] for r in results)
        self.batch_sizes.observe(len(results), tags=self.tags)
        self.tokens.inc(tokens, tags=self.tags)
        if results[0]["generate_s"] > 0:
            self.speed.observe(tokens / results[0]["generate_s"], tags=self.tags)

    async def stream(self, spec: dict):
        """Yields {"error"} or {"prompt_tokens"} first, then {"text"} pieces, then {"final": result}."""
        try:
            job = self.engine.prepare(spec)
        except APIError as e:
            yield {"error": e.to_dict()}
            return
        yield {"prompt_tokens": len(job.ids)}
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()  # set when the client goes away: generation stops at the next token

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        future = asyncio.ensure_future(self._run(self.engine.stream, job, emit, cancel))
        future.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (text := await queue.get()) is not None:
                yield {"text": text}
            result = future.result()
            self._observe([result])
            yield {"final": result}
        finally:
            cancel.set()


MODEL_DEPLOYMENT = ModelServer.name  # Serve's name for the deployment, as its logs and status show it
