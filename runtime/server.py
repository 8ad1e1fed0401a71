"""edge-serve's HTTP side: an OpenAI-compatible API on Starlette + uvicorn (``pip install 'edge[serve]'``).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming as server-sent
events ending with ``data: [DONE]``, or not), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health`` (no key needed: status, slots, queue, counters). Request bodies are read up to
``max_body_bytes`` (413 beyond), parsed and checked by runtime/openai_api.py; tokenizing runs in a
thread, generation on a slot of runtime/slots.py. Shutdown (SIGTERM, Ctrl-C): new requests get
503, answers in flight get ``drain_timeout`` seconds to end, then are cancelled; the process
exits 0 once they have.
"""

from __future__ import annotations

import asyncio
import hmac
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge.errors import ImageError, PromptError

from edge.runtime import openai_api as api
from edge.runtime.chat import check_room, fit_messages
from edge.runtime.chat_prompt import Prompt, text_prompt
from edge.runtime.slots import Job, SlotPool

if TYPE_CHECKING:
    from edge.runtime.model import Model


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 1  # slots: answers generated at once, each with its own KV cache
    queue: int = 16  # requests that may wait for a slot; beyond that, 429
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    max_tokens_limit: int | None = None  # a request asking more is refused (400); None = the bundle's context
    max_body_bytes: int = 8 << 20  # 413 beyond (images come as base64 in the body)
    drain_timeout: float = 10.0  # seconds answers in flight get at shutdown before they are cancelled
    overflow: str = "refuse"  # a conversation longer than the context: "refuse" (400) or "drop_oldest"
    model_name: str | None = None  # the id /v1/models lists; None = the bundle folder's name
    log_requests: bool = True  # one line per answer on stderr


class EdgeServer:
    def __init__(self, model: "Model", cfg: ServeConfig):
        self.model, self.cfg = model, cfg
        self.name = cfg.model_name or model.bundle.path.name
        self.max_tokens_limit = min(cfg.max_tokens_limit or model.max_context, model.max_context)
        self.created = int(time.time())
        self.pool = SlotPool(model, cfg.parallel, cfg.queue, on_end=self._log if cfg.log_requests else None)

    def app(self) -> Starlette:
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model_id:path}", self.model_info, methods=["GET"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _internal_error})

    # ---------------------------------------------------------------- small routes
    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"model": self.name, **self.pool.health()})

    def _model_card(self) -> dict:
        m = self.model
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "edge",
                "context_length": m.max_context, "vision": m.vision is not None}

    async def models(self, request: HttpRequest) -> Response:
        return self._guard(request) or JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: HttpRequest) -> Response:
        if denied := self._guard(request):
            return denied
        if request.path_params["model_id"] != self.name:
            return _error(api.ApiError(404, f"the model {request.path_params['model_id']!r} does not exist",
                                       param="model", code="model_not_found"))
        return JSONResponse(self._model_card())

    def _guard(self, request: HttpRequest) -> Response | None:
        key = self.cfg.api_key
        if key is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return None
        return _error(api.ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))

    # ---------------------------------------------------------------- completions
    async def chat(self, request: HttpRequest) -> Response:
        return await self._serve(request, "chat")

    async def completions(self, request: HttpRequest) -> Response:
        return await self._serve(request, "completion")

    async def _serve(self, request: HttpRequest, kind: str) -> Response:
        if denied := self._guard(request):
            return denied
        try:
            self.pool.admit()
            body = api.parse_json(await self._read_body(request))
            if kind == "chat":
                req = api.parse_chat(body, self.name, self.max_tokens_limit, self.max_tokens_limit,
                                     self.model.vision is not None)
            else:
                req = api.parse_completion(body, self.name, self.max_tokens_limit, self.model.config.vocab_size)
            started = time.perf_counter()
            prompt, dropped = await run_in_threadpool(self._prompt, req)
            job = await _unless_disconnected(request, self.pool.start(prompt, req.options, dropped, started))
        except api.ApiError as e:
            return _error(e)
        except ClientDisconnect:  # gone while sending its body
            return Response(status_code=499)
        if job is None:  # the client left while its request waited
            return Response(status_code=499)
        # from here on a disconnect stops the generation, even one before the stream's first byte
        watch = _stop_on_disconnect(request, job)
        if req.stream:
            return StreamingResponse(self._events(job, req, watch), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(job, req, watch)

    def _prompt(self, req: api.Request) -> tuple[Prompt, int]:
        try:
            if req.kind == "chat":
                prompt, _, dropped = fit_messages(self.model, list(req.messages), req.options.max_new_tokens,
                                                  self.cfg.overflow)
                return prompt, dropped
            if isinstance(req.prompt, str):
                prompt = text_prompt(self.model.encode_prompt(req.prompt, raw=True))
            else:
                prompt = text_prompt(req.prompt)
            check_room(self.model, len(prompt), 1)
            return prompt, 0
        except PromptError as e:
            raise api.from_prompt_error(e, "messages" if req.kind == "chat" else "prompt") from None

    async def _read_body(self, request: HttpRequest) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = "the request body is {} bytes; this server accepts at most {} (--max-body-bytes)"
        if declared is not None:
            if not declared.strip().isdigit():
                raise api.ApiError(400, f"invalid Content-Length {declared[:40]!r}")
            if int(declared) > limit:
                raise api.ApiError(413, too_big.format(int(declared), limit), code="request_too_large")
        buf = bytearray()
        async for part in request.stream():
            buf += part
            if len(buf) > limit:
                raise api.ApiError(413, too_big.format(f"more than {limit}", limit), code="request_too_large")
        return bytes(buf)

    def _usage(self, job: Job) -> dict:
        st = job.completion.stats
        return api.usage(st.prompt_tokens, st.cached_tokens, st.completion_tokens)

    async def _collect(self, job: Job, req: api.Request, watch: asyncio.Task) -> Response:
        text = []
        try:
            while True:
                what, value = await job.events.get()
                if what == "text":
                    text.append(value)
                elif what == "error":
                    return _error(_as_api_error(value))
                else:
                    break
        finally:
            watch.cancel()
        st = job.completion.stats
        if st.finish_reason == "cancelled":
            return _error(_cancelled(job))
        return JSONResponse(api.response(req.kind, api.new_id(req.kind), self.name, "".join(text), st.finish_reason,
                                         self._usage(job)))

    async def _events(self, job: Job, req: api.Request, watch: asyncio.Task) -> AsyncIterator[bytes]:
        rid, created, kind = api.new_id(req.kind), int(time.time()), req.kind
        ended = False
        try:
            if kind == "chat":
                yield api.sse(api.chunk(kind, rid, self.name, created, first=True))
            while True:
                what, value = await job.events.get()
                if what == "text":
                    yield api.sse(api.chunk(kind, rid, self.name, created, text=value))
                    continue
                ended = True
                if what == "error":
                    yield api.sse(_as_api_error(value).body())
                elif value.stats.finish_reason == "cancelled":
                    yield api.sse(_cancelled(job).body())
                else:
                    yield api.sse(api.chunk(kind, rid, self.name, created, finish=value.stats.finish_reason))
                    if req.include_usage:
                        yield api.sse(api.chunk(kind, rid, self.name, created, use=self._usage(job)))
                break
            yield b"data: [DONE]\n\n"
        finally:
            watch.cancel()
            if not ended:  # the client went away (Starlette cancels the stream on http.disconnect)
                job.stop("disconnect")

    def _log(self, job: Job) -> None:
        c = job.completion
        if c is None:
            print(f"edge-serve: slot {job.slot}: error: {job.error}", file=sys.stderr, flush=True)
            return
        st = c.stats
        reason = f"cancelled ({job.reason})" if st.finish_reason == "cancelled" else st.finish_reason
        print(f"edge-serve: slot {job.slot}: prompt {st.prompt_tokens} tokens ({st.cached_tokens} cached), "
              f"{st.completion_tokens} new, first token {1e3 * (st.ttft_s or 0):.0f} ms, {st.elapsed_s:.2f} s, {reason}",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------- helpers
async def _disconnected(request: HttpRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _stop_on_disconnect(request: HttpRequest, job: Job) -> asyncio.Task:
    def done(task: asyncio.Task) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a receive() that failed means the client is gone too
            job.stop("disconnect")

    watch = asyncio.ensure_future(_disconnected(request))
    watch.add_done_callback(done)
    return watch


async def _unless_disconnected(request: HttpRequest, work):
    """``await work``, unless the client disconnects first (then None; the work is cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watch.cancel()
        return task.result()
    task.cancel()
    return None


def _cancelled(job: Job) -> api.ApiError:
    if job.reason == "shutdown":
        return api.ApiError(503, "the server shut down before the answer was complete", type="server_error",
                            code="shutting_down")
    return api.ApiError(499, "the request was cancelled", code="cancelled")


def _as_api_error(e: BaseException) -> api.ApiError:
    if isinstance(e, api.ApiError):
        return e
    if isinstance(e, PromptError):
        return api.from_prompt_error(e, "messages" if isinstance(e, ImageError) else None)
    print("edge-serve: internal error:\n" + "".join(traceback.format_exception(e)), file=sys.stderr, flush=True)
    return api.ApiError(500, f"internal error ({type(e).__name__})", type="server_error")


def _error(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request: HttpRequest, exc: HTTPException) -> Response:
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return _error(api.ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                               code="not_found" if exc.status_code == 404 else None, headers=exc.headers))


async def _internal_error(request: HttpRequest, exc: Exception) -> Response:
    return _error(_as_api_error(exc))


# ---------------------------------------------------------------- running
class _Uvicorn(uvicorn.Server):
    """uvicorn's server with edge's shutdown: the first SIGTERM/SIGINT drains (in-flight answers
    get the drain timeout, then are cancelled), a second SIGINT forces; the signal is not re-raised
    afterwards, so a drained server exits 0."""

    def __init__(self, config: uvicorn.Config, edge: EdgeServer):
        super().__init__(config)
        self.edge = edge

    async def startup(self, sockets=None) -> None:
        self.edge.pool.bind(asyncio.get_running_loop())
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            cfg = self.edge.cfg
            print(f"edge-serve: serving {self.edge.name!r} on http://{host}:{port} (parallel {cfg.parallel}, "
                  f"queue {cfg.queue}, max_tokens <= {self.edge.max_tokens_limit}"
                  f"{', API key required' if cfg.api_key else ''})", file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        # a signal handler: set flags, leave the rest (printing included) to the event loop
        pool = self.edge.pool
        if self.should_exit:
            if sig == signal.SIGINT:
                self.force_exit = True
                pool.cancel_all("shutdown")
            return
        self.should_exit = True
        pool.drain(self.edge.cfg.drain_timeout)
        pool.soon(lambda: print(f"edge-serve: {signal.Signals(sig).name}: draining ({len(pool.jobs)} in flight, "
                                f"{self.edge.cfg.drain_timeout:g} s)", file=sys.stderr, flush=True))


def serve(model: "Model", cfg: ServeConfig) -> int:
    """Serve until SIGTERM / Ctrl-C; returns the exit status."""
    edge = EdgeServer(model, cfg)
    try:
        infos = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
        sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
    except OSError as e:
        print(f"edge-serve: error: cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e})", file=sys.stderr)
        return 1
    config = uvicorn.Config(edge.app(), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=cfg.drain_timeout + 5)
    server = _Uvicorn(config, edge)
    try:
        server.run(sockets=[sock])
    finally:
        edge.pool.close()
        sock.close()
    print("edge-serve: stopped", file=sys.stderr, flush=True)
    return 0
