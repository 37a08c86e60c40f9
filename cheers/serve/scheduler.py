"""The scheduler: one thread owns the model and batches the requests of every HTTP client.

* Image requests (generations and edits) that arrive within ``batch_window_ms`` of the first
  one, and share its sampling settings, run as one sampler batch (their CFG rows included).
* Chat requests decode together in the engine's ``DecodeBatch``: a request joins between two decode
  steps and leaves as soon as it is done, so a long answer does not hold up a short one. While
  an image batch samples, the chat batch decodes between its steps, for as long as each step
  took: images and chats share the model by time.
* At most ``queue_size`` requests wait or run; one more is refused (HTTP 429).
* A request whose client went away (:meth:`Scheduler.cancel`) leaves at once if it waits, else
  at the next decode step or sampler step: its KV rows and queue slot are freed and it counts
  as ``cancelled``. An image batch whose every request is cancelled stops sampling; one shared
  with live requests keeps the cancelled rows until it ends (the sampler's batch is fixed).

With ``max_batch == 1`` it serves one request at a time, in arrival order (the reference the
load benchmark compares against).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque

import torch

from cheers.decode_batch import RowSampling
from cheers.detokenizer import Detokenizer
from cheers.pipeline import Pipeline
from cheers.serve.config import ServeConfig
from cheers.serve.errors import APIError
from cheers.serve.metrics import ServeMetrics
from cheers.serve.validation import ChatRequest, ImageRequest

log = logging.getLogger("cheers.serve")


class QueueFull(Exception):
    """The queue holds ``queue_size`` requests; ``retry_after`` estimates when to come back (s)."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server's queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Abandoned(Exception):
    """Every request of the running image batch was cancelled: stop sampling."""


class Job:
    """A request in the scheduler. Its events go back to the event loop that submitted it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # the client went away: drop the job at the next chance
        self.finished = False  # counted once: completed, failed or cancelled
        self.submitted = time.monotonic()
        self.last_token: float | None = None  # when a chat row last got a token

    def post(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def fail(self, error: Exception) -> None:
        self.post("error", error)


class ImageJob(Job):
    """Events: ``("done", [PIL images])`` or ``("error", exception)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: ImageRequest):
        super().__init__(loop)
        self.request = request


class ChatJob(Job):
    """Events: ``("text", piece)`` as the answer grows, then ``("done", finish_reason, usage)``
    (or ``("error", exception)``).

    The answer is assembled as ``Pipeline.stream`` assembles it, and stripped like
    ``Pipeline.understand``'s: leading and trailing whitespace is held back until text follows
    it. Text that could be the start of a ``stop`` string is held back too.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, request: ChatRequest, text_tokenizer, stop_ids: set[int]):
        super().__init__(loop)
        self.request = request
        self.stop_ids = stop_ids
        self.detokenizer = Detokenizer(text_tokenizer)
        self.generated = 0
        self.result: tuple | None = None
        self.answer = ""  # what ``Pipeline.stream`` would have yielded so far, joined
        self.sent = 0  # characters of the stripped answer posted
        self.hold = max((len(s) for s in request.stop), default=1) - 1

    def feed(self, token: int) -> bool:
        """Take the next token of this row; True when the answer is finished (its ``done``
        event is then ``result``, for the scheduler to post once it has counted the job)."""
        self.generated += 1
        finish = None
        if token in self.stop_ids:
            self.answer += self.detokenizer.flush()
            finish = "stop"
        else:
            self.answer += self.detokenizer.push(token)
            if self.generated >= self.request.max_tokens:
                self.answer += self.detokenizer.flush()
                finish = "length"
        cut = [i for i in (self.answer.find(s) for s in self.request.stop) if i >= 0]
        if cut:
            self.answer, finish = self.answer[:min(cut)], "stop"
        text = self.answer.lstrip()
        end = len(text.rstrip())
        if finish is None:
            end = min(end, len(text) - self.hold)
        if end > self.sent:
            self.post("text", text[self.sent:end])
            self.sent = end
        if finish is not None:
            p = self.request.prompt_tokens
            self.result = ("done", finish, {"prompt_tokens": p, "completion_tokens": self.generated,
                                            "total_tokens": p + self.generated})
        return finish is not None


class Scheduler:
    """Owns ``pipe`` in its own thread; ``submit`` is safe to call from any thread."""

    def __init__(self, pipe: Pipeline, cfg: ServeConfig, metrics: ServeMetrics | None = None):
        self.pipe = pipe
        self.cfg = cfg
        self.metrics = metrics or ServeMetrics()
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._rows: list[ChatJob] = []  # decoding now, in the batch's row order
        self._batch = pipe.engine.decode_batch()
        self._sampling = 0  # image jobs in the sampler now, less those cancelled there
        self._images: list[ImageJob] = []  # the running image batch
        self._stop_ids = {pipe.cfg.tokens.eos, pipe.cfg.tokens.pad}
        self._job_seconds = 1.0  # running mean of a request's time in the server (for Retry-After)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.draining = False  # shutting down: running requests finish, new ones get 503
        self.crash: BaseException | None = None  # what killed the scheduler thread
        self._step_started = 0.0  # when the running sampler step began
        self.stats = {"sampler_calls": 0, "image_rows": 0, "largest_image_batch": 0, "decode_steps": 0,
                      "largest_chat_batch": 0, "prefills": 0, "completed": 0, "failed": 0, "rejected": 0,
                      "cancelled": 0}

    @property
    def sequential(self) -> bool:
        return self.cfg.max_batch == 1

    # ------------------------------------------------------------------ client side

    @property
    def alive(self) -> bool:
        """The model thread runs (or has not been started yet)."""
        return self.crash is None and (self._thread is None or self._thread.is_alive())

    def load(self) -> dict:
        with self._cond:
            return {"waiting": len(self._pending), "decoding": len(self._rows), "sampling": self._sampling,
                    "capacity": self.cfg.queue_size}

    def unavailable(self) -> APIError | None:
        """Why the scheduler takes no new request (a 503), or None."""
        if self._stopping or self.draining:
            return APIError(503, "the server is shutting down", code="shutting_down")
        if not self.alive:
            return APIError(503, "the server's model thread has stopped; it serves no requests until restarted",
                            code="scheduler_dead")
        return None

    def chat_job(self, loop: asyncio.AbstractEventLoop, request: ChatRequest) -> ChatJob:
        return ChatJob(loop, request, self.pipe.text_tokenizer, self._stop_ids)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` when ``queue_size`` requests wait or run."""
        with self._cond:
            self.room()
            self._pending.append(job)
            self._cond.notify()

    def room(self) -> None:
        """Raises the refusal ``submit`` would give now (503, :class:`QueueFull`), so a request
        can be refused before any work is done for it."""
        with self._cond:
            if (refused := self.unavailable()) is not None:
                raise refused
            if len(self._pending) + len(self._rows) + self._sampling >= self.cfg.queue_size:
                self.stats["rejected"] += 1
                raise QueueFull(max(1, math.ceil(self._job_seconds)))

    def cancel(self, job: Job) -> None:
        """The client of ``job`` went away. A waiting job leaves now; a running one at the next
        decode or sampler step. A no-op for a finished job."""
        with self._cond:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self._finished(job, "cancelled")
            elif isinstance(job, ImageJob) and job in self._images:
                self._sampling -= 1  # its queue slot frees now; its rows end with the batch
                self._finished(job, "cancelled")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_guarded, name="cheers-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        gone = APIError(503, "the server is shutting down", code="shutting_down")
        for job in [*self._pending, *self._rows, *self._images]:
            if not job.finished:
                self._finished(job, "failed")
                job.fail(gone)
        self._pending.clear()
        self._rows, self._images = [], []

    # ------------------------------------------------------------------ the model thread

    def _run_guarded(self) -> None:
        """``_run``; if it dies, every request it holds fails now with a 503 instead of hanging."""
        try:
            self._run()
        except BaseException as e:
            log.exception("the scheduler thread died; the server answers 503 until it is restarted")
            with self._cond:
                self.crash = e
                jobs = [*self._pending, *self._rows, *self._images]
                self._pending.clear()
                self._rows, self._images, self._sampling = [], [], 0
            dead = self.unavailable()
            for job in jobs:
                if not job.finished:
                    self._finished(job, "failed")
                    job.fail(dead)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._pending or self._rows):
                    self._cond.wait()
                if self._stopping:
                    return
                images, wait = self._take_images()
            if images:
                self._run_images(images)
            elif self._rows or self._chat_waiting():
                self._chat_step()
            elif wait:
                with self._cond:
                    self._cond.wait(timeout=wait)

    def _finished(self, job: Job, outcome: str) -> None:
        """Count ``job`` once as ``completed``, ``failed`` or ``cancelled``."""
        with self._cond:  # the client side cancels under the same lock
            if job.finished:
                return
            job.finished = True
            self.stats[outcome] += 1
        if outcome == "cancelled":
            self.metrics.cancelled.inc()
        else:
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.monotonic() - job.submitted)

    def _take_images(self) -> tuple[list[ImageJob], float | None]:
        """Image jobs to sample now (under the lock), or how long to wait for more to join."""
        if self.sequential:
            if self._rows or not self._pending or not isinstance(self._pending[0], ImageJob):
                return [], None
            return [self._claim(self._pending[0])], None
        jobs = [j for j in self._pending if isinstance(j, ImageJob)]
        if not jobs:
            return [], None
        key = jobs[0].request.batch_key
        take, rows = [], 0
        for job in jobs:
            if job.request.batch_key != key:
                continue
            if take and rows + job.request.n > self.cfg.max_batch:
                break
            take.append(job)
            rows += job.request.n
        waited = time.monotonic() - jobs[0].submitted
        window = self.cfg.batch_window_ms / 1000
        if rows < self.cfg.max_batch and waited < window:
            return [], window - waited
        return [self._claim(j) for j in take], None

    def _claim(self, job: ImageJob) -> ImageJob:
        self._pending.remove(job)
        self._sampling += 1
        self._images.append(job)
        return job

    def _run_images(self, jobs: list[ImageJob]) -> None:
        try:
            self._batch_or_alone(jobs, self._post_images, "an image batch")
        finally:
            with self._cond:
                self._sampling -= sum(1 for j in jobs if not j.cancelled)
                self._images = []

    def _batch_or_alone(self, jobs: list[Job], run, what: str) -> None:
        """``run(jobs)``; if that fails, ``run([job])`` for each, so only a request that fails
        alone gets the error."""
        try:
            run(jobs)
        except Abandoned:
            log.info("an image batch of %d requests stopped: every client went away", len(jobs))
        except Exception as e:
            if len(jobs) > 1:
                log.warning("%s of %d requests failed (%s); running them one by one", what, len(jobs), e)
                for job in jobs:
                    self._batch_or_alone([job], run, what)
                return
            log.exception("%s failed", what)
            self._finished(jobs[0], "failed")
            jobs[0].fail(e)

    def _post_images(self, jobs: list[ImageJob]) -> None:
        for job, images in zip(jobs, self._sample(jobs), strict=True):
            if not job.cancelled:
                self._finished(job, "completed")
                job.post("done", images)
                self.metrics.images.inc(len(images))

    def _sample(self, jobs: list[ImageJob]) -> list[list]:
        """One sampler call for every image of ``jobs`` -> each job's PIL images."""
        first = jobs[0].request
        prompts = [j.request.prompt for j in jobs for _ in range(j.request.n)]
        seeds = [s for j in jobs for s in j.request.seeds]
        edit = {} if first.source is None else {
            "sources": [j.request.source for j in jobs for _ in range(j.request.n)], "strength": first.strength}
        self.metrics.sampler_batch.observe(len(prompts))
        self._step_started = time.monotonic()
        images = self.pipe.sample(prompts, seeds=seeds, steps=first.steps, cfg_scale=first.cfg_scale,
                                  shift=first.shift, callback=lambda _step: self._between_steps(jobs), **edit)
        self.stats["sampler_calls"] += 1
        self.stats["image_rows"] += len(prompts)
        self.stats["largest_image_batch"] = max(self.stats["largest_image_batch"], len(prompts))
        out, k = [], 0
        for job in jobs:
            out.append(images[k:k + job.request.n])
            k += job.request.n
        return out

    def _between_steps(self, jobs: list[ImageJob]) -> None:
        """Between two sampler steps the batch stops if all its clients went away, and the chat
        batch decodes for as long as the step took (at least one token), so images and chats
        share the model thread by time."""
        if all(j.cancelled for j in jobs):
            raise Abandoned
        if self.sequential or self._stopping:
            return
        until = 2 * time.monotonic() - self._step_started
        self._chat_step()
        while self._rows and time.monotonic() < until:
            self._chat_step()
        self._step_started = time.monotonic()

    # ------------------------------------------------------------------ chat

    def _chat_waiting(self) -> bool:
        with self._cond:
            return any(isinstance(j, ChatJob) for j in self._pending)

    def _take_chats(self) -> list[ChatJob]:
        with self._cond:
            if self.sequential:
                if self._rows or not self._pending or not isinstance(self._pending[0], ChatJob):
                    return []
                return [self._pending.popleft()]
            room = self.cfg.max_batch - len(self._rows)
            take = [j for j in self._pending if isinstance(j, ChatJob)][:room]
            for job in take:
                self._pending.remove(job)
            return take

    def _join(self, jobs: list[ChatJob]) -> None:
        """Prefill ``jobs`` into the decode batch."""
        device = self.pipe.engine.device
        sampling = [RowSampling(j.request.temperature, j.request.top_p,
                                torch.Generator(device=device).manual_seed(j.request.seed)) for j in jobs]
        self._batch.join([j.request.ids for j in jobs], [j.request.images for j in jobs], sampling)
        self.stats["prefills"] += 1
        with self._cond:
            self._rows += jobs

    def _chat_step(self) -> None:
        """Admit waiting chats, then decode one token for every row; finished rows leave."""
        joining = self._take_chats()
        if joining:
            self._batch_or_alone(joining, self._join, "a chat prefill")
        if not self._rows:
            return
        try:
            tokens = self._batch.pick()
            now = time.monotonic()
            done = []
            for r, (job, tok) in enumerate(zip(self._rows, tokens, strict=True)):
                if job.cancelled:
                    done.append(r)
                    self._finished(job, "cancelled")
                    continue
                if job.last_token is None:
                    self.metrics.time_to_first_token.observe(now - job.submitted)
                else:
                    self.metrics.inter_token_latency.observe(now - job.last_token)
                job.last_token = now
                self.metrics.tokens.inc()
                if job.feed(tok):
                    done.append(r)
                    self._finished(job, "completed")  # before the client can see the end
                    job.post(*job.result)
            self._batch.drop(done)
            with self._cond:
                self._rows = [job for r, job in enumerate(self._rows) if r not in done]
            self._batch.advance([tok for r, tok in enumerate(tokens) if r not in done])
            self.stats["decode_steps"] += 1
            self.stats["largest_chat_batch"] = max(self.stats["largest_chat_batch"], len(tokens))
        except Exception as e:
            log.exception("a decode step failed; failing the %d chat requests in it", len(self._rows))
            for job in self._rows:
                self._finished(job, "failed")
                job.fail(e)
            with self._cond:
                self._rows = []
            self._batch = self.pipe.engine.decode_batch()
