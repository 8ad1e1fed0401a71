"""Serving slots: N ChatSessions over one loaded Model (each its own KV cache), a bounded wait
queue, generation in worker threads, cancellation, and the counters /health reports.

Everything here but ``Job._work`` runs on the server's event loop thread. A request waits for a
free slot (429 when ``queue`` requests already wait; 503 once the server drains); of the free
slots it takes the one whose cached rows share the longest prefix with its prompt (an OpenAI
client resends the whole conversation each turn, so a follow-up prefills only its new tokens).
A job's cancel flag is read between tokens: a disconnected client or a shutdown stops its
generation at the next token.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

from edge.runtime.chat import ChatSession, Completion, GenerationOptions, common_prefix
from edge.runtime.chat_prompt import Prompt
from edge.runtime.openai_api import ApiError

if TYPE_CHECKING:
    from edge.runtime.model import Model


@dataclass
class Counters:
    requests: int = 0  # generations started
    completed: int = 0  # ended by an end token, a stop string or the token budget
    cancelled_disconnect: int = 0  # the client went away mid-answer
    cancelled_shutdown: int = 0  # cut by the drain timeout of a shutdown
    rejected_queue_full: int = 0  # 429
    rejected_draining: int = 0  # 503
    errors: int = 0  # a generation that raised
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt rows reused from a slot's KV cache
    completion_tokens: int = 0


class Job:
    """One answer on one slot. ``events`` yields ("text", str), then ("end", Completion) or
    ("error", exception)."""

    def __init__(self, pool: "SlotPool", slot: int, prompt: Prompt, options: GenerationOptions, dropped: int,
                 started: float):
        self.pool, self.slot, self.prompt, self.options = pool, slot, prompt, options
        self.dropped, self.started = dropped, started
        self.cancel = threading.Event()
        self.reason: str | None = None  # why it was cancelled: "disconnect" | "shutdown"
        self.events: asyncio.Queue = asyncio.Queue()
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.done = False

    def stop(self, reason: str) -> None:
        if not self.done:
            self.reason = self.reason or reason
            self.cancel.set()

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                self.cancel.set()

        session = self.pool.sessions[self.slot]
        try:
            c = session.generate(self.prompt, self.options, self.cancel, self.dropped, self.started)
            self.completion = c
            for piece in c:
                put(("text", piece))
            put(("end", c))
        except Exception as e:  # reported to the client; the server keeps serving
            self.error = e
            put(("error", e))


class SlotPool:
    def __init__(self, model: "Model", parallel: int, queue: int, on_end: Callable[[Job], None] | None = None):
        self.model = model
        self.sessions = [ChatSession(model) for _ in range(parallel)]
        self.queue_limit = queue
        self.free = list(range(parallel))
        self.waiters: deque[asyncio.Future] = deque()
        self.jobs: set[Job] = set()
        self.executor = ThreadPoolExecutor(parallel, thread_name_prefix="edge-slot")
        self.counters = Counters()
        self.draining = False
        self.on_end = on_end
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def parallel(self) -> int:
        return len(self.sessions)

    def health(self) -> dict:
        return {"status": "draining" if self.draining else "ok",
                "slots": {"total": self.parallel, "busy": self.parallel - len(self.free)},
                "queue": {"waiting": len(self.waiters), "limit": self.queue_limit},
                "counters": asdict(self.counters)}

    async def start(self, prompt: Prompt, options: GenerationOptions, dropped: int, started: float) -> Job:
        """Take a slot (waiting in the queue if need be) and start generating on it."""
        self.bind(asyncio.get_running_loop())
        self.admit()
        if not self.free or self.waiters:
            if len(self.waiters) >= self.queue_limit:
                self.counters.rejected_queue_full += 1
                raise ApiError(429, f"all {self.parallel} slots are busy and {len(self.waiters)} requests are waiting "
                                    f"(--queue {self.queue_limit}); retry later", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"})
            await self._wait()
        slot = self._pick(prompt.keys)
        job = Job(self, slot, prompt, options, dropped, started)
        self.jobs.add(job)
        self.counters.requests += 1
        fut = self._loop.run_in_executor(self.executor, job._work, self._loop)
        fut.add_done_callback(lambda _: self._finish(job))
        return job

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the pool lives on (drain and cancel_all reach it from other threads)."""
        self._loop = loop

    def soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the pool's event loop (from any thread, or a signal handler)."""
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(fn)
            except RuntimeError:  # the loop is closed
                pass

    def admit(self) -> None:
        """503 once the server drains."""
        if self.draining:
            self.counters.rejected_draining += 1
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")

    async def _wait(self) -> None:
        """Queue until a slot is free; first come, first served."""
        front = False
        while True:
            fut = self._loop.create_future()
            (self.waiters.appendleft if front else self.waiters.append)(fut)
            try:
                await fut
            except asyncio.CancelledError:  # the client went away while waiting
                if fut in self.waiters:
                    self.waiters.remove(fut)
                elif fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._wake()  # it was woken for a free slot: pass the turn on
                raise
            self.admit()
            if self.free:
                return
            front = True

    def _wake(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _pick(self, keys) -> int:
        """The free slot whose cache shares most with ``keys``; on a tie the one caching least."""
        best = max(self.free, key=lambda i: (common_prefix(self.sessions[i]._keys, keys),
                                             -len(self.sessions[i]._keys)))
        self.free.remove(best)
        return best

    def _finish(self, job: Job) -> None:
        job.done = True
        self.jobs.discard(job)
        st = job.completion.stats if job.completion is not None else None
        c = self.counters
        if job.error is not None:
            c.errors += 1
        elif st is not None and st.finish_reason == "cancelled":
            if job.reason == "shutdown":
                c.cancelled_shutdown += 1
            else:
                c.cancelled_disconnect += 1
        else:
            c.completed += 1
        if st is not None:
            c.prompt_tokens += st.prompt_tokens
            c.cached_tokens += st.cached_tokens
            c.completion_tokens += st.completion_tokens
        self.free.append(job.slot)
        self._wake()
        if self.on_end is not None:
            self.on_end(job)

    # ---------------------------------------------------------------- shutdown (any thread)
    def drain(self, timeout: float) -> None:
        """Refuse new requests (503), and in-flight ones still running after ``timeout`` s are
        cancelled. Safe to call from a signal handler or another thread."""
        self.draining = True
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._refuse_waiters)
        except RuntimeError:
            return
        timer = threading.Timer(timeout, self.cancel_all, args=("shutdown",))
        timer.daemon = True
        timer.start()

    def _refuse_waiters(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.counters.rejected_draining += 1
                fut.set_exception(ApiError(503, "the server is shutting down", type="server_error",
                                           code="shutting_down"))

    def cancel_all(self, reason: str) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(lambda: [j.stop(reason) for j in list(self.jobs)])
        except RuntimeError:  # the loop is gone: stop the threads directly
            for j in list(self.jobs):
                j.stop(reason)

    def close(self) -> None:
        for j in list(self.jobs):
            j.stop("shutdown")
        self.executor.shutdown(wait=True)
