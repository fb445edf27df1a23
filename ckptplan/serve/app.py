"""The HTTP API (FastAPI on uvicorn; ``pip install 'ckptplan[serve]'``).

    POST /v1/solve          graph document + budget + options -> the plan (JSON, or YAML on Accept)
    POST /v1/sweep          graph document + budgets -> ckptplan and the baseline policies at each
    GET  /v1/plans/{key}    a stored answer by its key
    GET  /healthz           liveness, store and queue facts
    GET  /metrics           Prometheus text: requests, cache hits, solves, solve seconds, queue depth
    GET  /openapi.json      this API, described
    GET  /, /plans/{key}, /diff?a=KEY&b=KEY      the review pages (pages.py)

FastAPI because it is Starlette (a small, well-kept ASGI core, run by uvicorn) plus an OpenAPI
description generated from the same models that validate requests.

A solve request's body is a JSON object (``SolveBody``), optionally gzip-compressed
(``Content-Encoding: gzip``), at most ``max_body_bytes`` on the wire and inflated (413 beyond). Every
refusal is a 4xx JSON body ``{"error": NAME, "message": TEXT}`` naming the problem; an unexpected
failure is a 500 with its exception's name and message, its traceback only in the server's log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, MutableMapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import BudgetError, CkptplanError, InputError
from ..planner import DEFAULT_GAP, check_options
from ..units import parse_budget
from . import pages, wire
from .metrics import prometheus
from .pool import Busy, DeadlineExceeded, Job, Kind, Objective, Options, Planner, cache_key
from .schema import ErrorAnswer, SolveAnswer, SolveBody, SweepAnswer, SweepBody
from .store import Entry, Store

log = logging.getLogger("ckptplan.serve")

MAX_BODY_BYTES = 64 * 2**20  # a 7B step's document is a few MB gzipped
SYNTAX_REFERENCE = 2**50  # stands in for the no-checkpointing peak when only a budget's syntax is checked
ALIASES = 4096  # request bodies remembered by hash -> key, so a repeated request skips decoding
HOT_ANSWERS = 64  # answers to cache hits kept serialized in memory (stored plans never change)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    store: str = "ckptplan-plans.sqlite"
    workers: int = 1
    queue_limit: int = 16
    token: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    warm: bool = True  # start the worker processes at startup, not at the first solve


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Refusal(Exception):
    def __init__(
        self, status: int, error: str, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.headers, self.extra = status, error, message, headers, extra


def _refusal(status: int, error: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=status)


def create_app(config: Config, store: Store | None = None) -> FastAPI:
    """The app; it opens ``config.store`` at startup unless given an open ``store``."""
    state: dict[str, Any] = {}
    aliases: dict[str, tuple[str, Job, float]] = {}  # body sha256 -> (key, job, deadline)
    parsing: dict[str, asyncio.Future[tuple[str, Job, float]]] = {}  # body sha256 -> its validation, while it runs
    hits: dict[str, bytes] = {}  # key -> the JSON answer to a cache hit, for the most asked plans

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import torch

        nonlocal store
        store = store or Store(config.store)
        planner = Planner(
            store, workers=config.workers, queue_limit=config.queue_limit, torch_version=torch.__version__
        )
        if config.warm:
            planner.warm_up()
        state.update(store=store, planner=planner, started=time.time())
        log.info(
            "ckptplan %s serving plans from %s (%d plans), %d workers, queue %d",
            __version__,
            store.path,
            store.count(),
            config.workers,
            config.queue_limit,
        )
        try:
            yield
        finally:
            planner.shutdown()
            store.close()

    app = FastAPI(
        title="ckptplan",
        version=__version__,
        lifespan=lifespan,
        description="Activation-checkpointing plans as a service: one solve per distinct request, "
        "cached in SQLite, reviewed in the browser.",
    )

    app.add_middleware(_Edge, token=config.token, state=state)

    @app.exception_handler(Refusal)
    async def on_refusal(request: Request, e: Refusal) -> JSONResponse:
        r = _refusal(e.status, e.error, e.message, **e.extra)
        r.headers.update(e.headers or {})
        return r

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _refusal(422, "InputError", _validation_message(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _refusal(e.status_code, "HTTPError", str(e.detail))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _refusal(500, "InternalError", f"{type(e).__name__}: {e}")

    async def answer(request: Request, kind: Kind) -> tuple[str, Entry, str]:
        """The stored or solved entry for a solve or sweep request, how it was found; Refusal otherwise."""
        body = await _read_body(request, config.max_body_bytes)
        digest = hashlib.sha256(kind.value.encode() + b"\0" + body).hexdigest()
        known = aliases.get(digest)
        if known is None:
            # validating a 7B step's graph takes a second: in a thread, once for all identical bodies at once
            parse = parsing.get(digest)
            if parse is None:
                parse = asyncio.ensure_future(asyncio.to_thread(_parse, body, state["planner"].torch_version, kind))
                parsing[digest] = parse
                parse.add_done_callback(lambda _f: parsing.pop(digest, None))
            known = await asyncio.shield(parse)
            if len(aliases) >= ALIASES:
                aliases.pop(next(iter(aliases)))
            aliases[digest] = known
        key, job, deadline = known
        planner: Planner = state["planner"]
        try:
            entry, how = await planner.solve(job, deadline_s=deadline)
        except Busy as e:
            raise Refusal(
                503,
                "Busy",
                f"{planner.queue_depth} solves are queued, the server's limit; retry in {e.retry_after_s} s",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from None
        except DeadlineExceeded:
            raise Refusal(
                504,
                "DeadlineExceeded",
                f"no answer within the request's deadline of {deadline:g} s; "
                "the solve goes on: send the same request again later for its answer",
                headers={"Retry-After": "5"},
            ) from None
        return key, entry, how

    # ---- the API -------------------------------------------------------------------------------------
    @app.post(
        "/v1/solve",
        response_model=SolveAnswer,
        tags=["plans"],
        responses={
            413: {"model": ErrorAnswer},
            422: {"model": ErrorAnswer},
            503: {"model": ErrorAnswer},
            504: {"model": ErrorAnswer},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SolveBody.model_json_schema()}},
            }
        },
    )
    async def solve(request: Request) -> Response:
        """Plan a traced step: the stored plan when this request was answered before, else one solve
        (shared by every identical request arriving meanwhile). Send ``Accept: application/yaml`` for the
        plan file alone."""
        key, entry, how = await answer(request, Kind.SOLVE)
        headers = {"X-Ckptplan-Key": key, "X-Ckptplan-Cache": how}
        if entry.ok and how == "hit" and "application/yaml" not in request.headers.get("accept", ""):
            hot = hits.get(key)
            if hot is None:
                hot = _answer(key, how, entry)
                if len(hits) >= HOT_ANSWERS:
                    hits.pop(next(iter(hits)))
                hits[key] = hot
            return Response(hot, media_type="application/json", headers=headers)
        if not entry.ok:
            err = entry.error()
            code = {"WorkerDied": 503, "InternalError": 500, "SolverTimeout": 422}.get(err["error"], 422)
            return JSONResponse(err, status_code=code, headers=headers)
        if "application/yaml" in request.headers.get("accept", ""):
            return Response(entry.body, media_type="application/yaml", headers=headers)
        return Response(_answer(key, how, entry), media_type="application/json", headers=headers)

    @app.post(
        "/v1/sweep",
        response_model=SweepAnswer,
        tags=["plans"],
        responses={
            413: {"model": ErrorAnswer},
            422: {"model": ErrorAnswer},
            503: {"model": ErrorAnswer},
            504: {"model": ErrorAnswer},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SweepBody.model_json_schema()}},
            }
        },
    )
    async def sweep(request: Request) -> Response:
        """ckptplan against the baseline policies at several budgets (``ckptplan sweep``), predicted; cached
        like a solve. The review page of its key draws the Pareto plot."""
        key, entry, how = await answer(request, Kind.SWEEP)
        headers = {"X-Ckptplan-Key": key, "X-Ckptplan-Cache": how}
        if not entry.ok:
            err = entry.error()
            return JSONResponse(err, status_code=500 if err["error"] == "InternalError" else 422, headers=headers)
        return JSONResponse({"key": key, "cache": how, **json.loads(entry.body)}, headers=headers)

    @app.get("/v1/plans/{key}", response_model=SolveAnswer, tags=["plans"], responses={404: {"model": ErrorAnswer}})
    async def get_plan(key: str) -> Response:
        """A stored answer by the key a solve returned (header ``X-Ckptplan-Key``)."""
        entry = state["store"].get(key)
        if entry is None:
            raise Refusal(404, "NotFound", f"no stored plan has key {key!r}")
        if not entry.ok:
            return JSONResponse(entry.error(), status_code=422)
        if entry.kind is Kind.SWEEP:
            return JSONResponse({"key": key, "cache": "hit", **json.loads(entry.body)})
        return JSONResponse(
            {
                "key": key,
                "cache": "hit",
                "status": entry.status.value,
                "plan": entry.body,
                "solve_seconds": entry.solve_seconds,
            }
        )

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, Any]:
        store: Store = state["store"]
        planner: Planner = state["planner"]
        return {
            "status": "ok",
            "version": __version__,
            "store": str(store.path),
            "plans": store.count(),
            "recovered_corrupt_store": store.recovered,
            "workers": planner.workers,
            "workers_ready": planner.ready,
            "queue_depth": planner.queue_depth,
            "queue_limit": planner.queue_limit,
        }

    @app.get("/metrics", response_class=PlainTextResponse, tags=["operations"])
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(prometheus(state["planner"]), media_type="text/plain; version=0.0.4")

    # ---- the review pages ----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(pages.index(state["store"].recent()))

    @app.get("/plans/{key}", response_class=HTMLResponse, include_in_schema=False)
    async def plan_page(key: str) -> HTMLResponse:
        entry = state["store"].get(key)
        if entry is None:
            return HTMLResponse(pages.not_found(f"no stored plan has key {key}"), status_code=404)
        return HTMLResponse(pages.plan_page(entry))

    @app.get("/plans/{key}/yaml", response_class=PlainTextResponse, include_in_schema=False)
    async def plan_yaml(key: str) -> Response:
        entry = state["store"].get(key)
        if entry is None or not entry.ok or entry.kind is not Kind.SOLVE:
            raise Refusal(404, "NotFound", f"no stored plan has key {key!r}")
        return Response(entry.body, media_type="text/plain; charset=utf-8")

    @app.get("/diff", response_class=HTMLResponse, include_in_schema=False)
    async def diff_page(a: str, b: str) -> HTMLResponse:
        store: Store = state["store"]
        ea, eb = store.get(a), store.get(b)
        for key, e in ((a, ea), (b, eb)):
            if e is None or not e.ok or e.kind is not Kind.SOLVE:
                return HTMLResponse(pages.not_found(f"no stored plan has key {key}"), status_code=404)
        assert ea is not None and eb is not None  # checked in the loop above
        return HTMLResponse(pages.diff_page(ea, eb))

    return app


# ---- helpers --------------------------------------------------------------------------------------
class _Edge:
    """Pure ASGI middleware around every request: the bearer token, then one log line and the request
    counters for /metrics (cheaper than Starlette's BaseHTTPMiddleware on the cache-hit path)."""

    def __init__(self, app: Any, *, token: str | None, state: dict[str, Any]) -> None:
        self.app, self.token, self.state = app, token, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        path, method = scope["path"], scope["method"]
        seen: dict[str, Any] = {"status": 500, "cache": None}

        async def watch(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for k, v in message.get("headers", ()):
                    if k == b"x-ckptplan-cache":
                        seen["cache"] = v.decode()
            await send(message)

        try:
            if self.token is not None and path != "/healthz" and not _authorized(scope, self.token):
                refusal = _refusal(
                    401,
                    "Unauthorized",
                    "this server needs 'Authorization: Bearer TOKEN' (the token it was started with)",
                )
                refusal.headers["WWW-Authenticate"] = "Bearer"
                await refusal(scope, receive, watch)
            else:
                await self.app(scope, receive, watch)
        finally:
            planner: Planner | None = self.state.get("planner")
            if planner is not None:
                planner.metrics.count_request(method, _route(path), seen["status"])
            log.info(
                "%s %s %d %.1fms%s",
                method,
                path,
                seen["status"],
                1e3 * (time.monotonic() - started),
                f" cache={seen['cache']}" if seen["cache"] else "",
            )


def _answer(key: str, how: str, entry: Any) -> bytes:
    return json.dumps(
        {
            "key": key,
            "cache": how,
            "status": entry.status.value,
            "plan": entry.body,
            "solve_seconds": entry.solve_seconds,
        }
    ).encode()


def _route(path: str) -> str:
    """The route a path matches, so /metrics labels stay few."""
    for prefix, name in (("/v1/plans/", "/v1/plans/{key}"), ("/plans/", "/plans/{key}")):
        if path.startswith(prefix):
            return name
    known = ("/", "/v1/solve", "/v1/sweep", "/healthz", "/metrics", "/diff", "/openapi.json", "/docs")
    return path if path in known else "other"


def _authorized(scope: dict, token: str) -> bool:
    given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
    scheme, _, value = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise Refusal(
            413,
            "TooLarge",
            f"the body is {length} bytes; this server takes at most {limit:,} "
            "(send it gzip-compressed, Content-Encoding: gzip)",
        )
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise Refusal(413, "TooLarge", f"the body is over {limit:,} bytes, this server's limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "gzip":
        try:
            body = wire.decompress(body, limit=limit)
        except wire.TooLarge as e:
            raise Refusal(413, "TooLarge", str(e)) from None
        except wire.WireError as e:
            raise Refusal(400, "InputError", str(e)) from None
    elif encoding != "identity":
        raise Refusal(415, "InputError", f"Content-Encoding {encoding!r} is not supported; send gzip or nothing")
    return body


def _parse(body: bytes, torch_version: str, kind: Kind) -> tuple[str, Job, float]:
    """Validate a solve or sweep request; its cache key and job. Refusal (4xx) naming the first problem."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refusal(400, "InputError", f"the body is not JSON ({e})") from None
    try:
        req = (SolveBody if kind is Kind.SOLVE else SweepBody).model_validate(raw)
    except ValidationError as e:
        raise Refusal(422, "InputError", _validation_message(e.errors())) from None
    budgets = [req.budget] if isinstance(req, SolveBody) else req.budgets
    gap = req.gap if isinstance(req, SolveBody) else DEFAULT_GAP
    try:
        for b in budgets:
            if isinstance(b, int) and b <= 0:
                raise BudgetError(f"budget must be a positive number of bytes, not {b}")
            parse_budget(b, reference_bytes=SYNTAX_REFERENCE)
        check_options(reserve=req.reserve, gap=gap)
        graphs = wire.decode(req.graph)
        if kind is Kind.SWEEP and len(graphs) > 1:
            raise InputError("a sweep takes one traced shape; send one graph")
    except CkptplanError as e:
        raise Refusal(422, type(e).__name__, f"{e}") from None
    except (ValueError, TypeError) as e:  # e.g. a float where the format wants an int, caught by no check yet
        raise Refusal(422, "InputError", f"graph: {e}") from None
    graph_bytes = wire.dumps(wire.encode(graphs))  # canonical: the key does not depend on the client's JSON
    options = Options(
        budget=req.budget if isinstance(req, SolveBody) else tuple(req.budgets),
        kind=kind,
        objective=Objective(req.objective),
        time_limit_s=req.time_limit_s,
        reserve=req.reserve,
        gap=gap,
        rematerialize=req.rematerialize,
    )
    fingerprints = [g.fingerprint for g in graphs]
    key = cache_key(graph_bytes, fingerprints, options, torch_version)
    primary = max(graphs, key=lambda g: g.baseline_peak_bytes)
    job = Job(
        key=key, graph_bytes=graph_bytes, model=primary.model_name, fingerprint=primary.fingerprint, options=options
    )
    return key, job, req.deadline_s


def _validation_message(errors: Sequence[Any]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) + ("" if len(errors) <= 5 else f" (and {len(errors) - 5} more)")


def serve(*, host: str, port: int, config: Config) -> None:
    """Run the server until interrupted. A non-loopback address needs a token."""
    import uvicorn

    if not is_loopback(host) and not config.token:
        raise InputError(
            f"binding {host} exposes the planner beyond this machine: give a bearer token with "
            "--token or CKPTPLAN_TOKEN (clients send it with --token or CKPTPLAN_TOKEN)"
        )
    if config.workers < 1 or config.queue_limit < 1:
        raise InputError("--workers and --queue must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    store = Store(config.store)  # before the server starts: a store that cannot be opened is a usage error
    uvicorn.run(create_app(config, store), host=host, port=port, access_log=False, log_level="warning")
