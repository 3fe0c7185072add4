"""HTTP ingress (aiohttp): `POST /v1/events` in binary, structured and batch modes; health probes.

`202 Accepted` is sent only after every event of the request is durable.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web

from umcef.fabric.bindings.http import Mode, detect_mode
from umcef.fabric.errors import EventError
from umcef.fabric.limits import BODY_READ_SECONDS
from umcef.fabric.pipeline import Overloaded, Pipeline, ShuttingDown
from umcef.fabric.problems import PROBLEM_CONTENT_TYPE, for_event_error, problem

log = logging.getLogger("umcef.http")
PIPELINE_KEY = web.AppKey("pipeline", Pipeline)


def _json(status: int, body: dict[str, Any], content_type: str = "application/json",
          headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=content_type, headers=headers)


def _problem(body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return _json(body["status"], body, PROBLEM_CONTENT_TYPE, headers)


async def publish(request: web.Request) -> web.Response:
    pipeline = request.app[PIPELINE_KEY]
    limit = pipeline.limits.max_body_bytes
    if limit and request.content_length is not None and request.content_length > limit:
        return _problem(problem(413, "too-large", "Request too large",
                                f"body of {request.content_length} bytes exceeds the limit of {limit}"))
    if pipeline.closing:  # (before reading a body that would only be refused)
        return _shutting_down(ShuttingDown("the gateway is shutting down"))
    # Request bytes count against max_in_flight_bytes from before the body is read, so that many large
    # bodies arriving at once are refused rather than buffered: a body of unknown length (chunked) counts
    # as the largest one allowed.
    announced = request.content_length if request.content_length is not None else limit or 0
    try:
        with pipeline.holding(announced) as held:
            try:
                # Bounded: a client that announces a body and stalls must not hold its bytes for ever.
                async with asyncio.timeout(BODY_READ_SECONDS):
                    body = await request.read()
            except TimeoutError:
                return _problem(problem(408, "timeout", "Request timeout",
                                        f"the body did not arrive within {BODY_READ_SECONDS:g} s"))
            except web.HTTPRequestEntityTooLarge:
                return _problem(problem(413, "too-large", "Request too large",
                                        f"body exceeds the limit of {limit} bytes"))
            held.resize(len(body))  # from now on the body holds what it is, not what it announced
            return await _publish(pipeline, request.headers, body)
    except Overloaded as exc:  # (from the hold: _publish answers the pipeline's own)
        return _overloaded(exc)


async def _publish(pipeline: Pipeline, headers: Any, body: bytes) -> web.Response:
    try:
        result = await pipeline.ingest_http(headers, body, size=0)  # (its bytes are held above)
    except EventError as exc:
        try:
            binary = detect_mode(headers) is Mode.BINARY
        except EventError:
            binary = False
        return _problem(for_event_error(exc, binary))
    except Overloaded as exc:
        return _overloaded(exc)
    except ShuttingDown as exc:
        return _shutting_down(exc)
    return _json(202, {"accepted": result.ids, "duplicates": result.duplicates})


def _overloaded(exc: Overloaded) -> web.Response:
    seconds = max(1, round(exc.retry_after))
    return _problem(problem(429, "overloaded", "Too many requests", str(exc)), {"Retry-After": str(seconds)})


def _shutting_down(exc: ShuttingDown) -> web.Response:
    return _problem(problem(503, "shutting-down", "Service unavailable", str(exc)), {"Retry-After": "1"})


async def healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[PIPELINE_KEY].closing:
        return _json(503, {"status": "draining"})
    return _json(200, {"status": "ready"})


@web.middleware
async def problem_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown paths and wrong methods answer problem+json too; a bug answers 500 without a traceback."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _problem(problem(exc.status, "http", exc.reason, f"{request.method} {request.path}: {exc.reason}"))
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return _problem(problem(500, "internal", "Internal error", "the gateway failed; the event was not accepted"))


def create_app(pipeline: Pipeline) -> web.Application:
    # client_max_size caps reads for chunked bodies with no Content-Length; +1 so "exactly the limit" passes.
    max_size = (pipeline.limits.max_body_bytes or 2**31) + 1
    app = web.Application(client_max_size=max_size, middlewares=[problem_middleware])
    app[PIPELINE_KEY] = pipeline
    app.router.add_post("/v1/events", publish)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_http_server(pipeline: Pipeline, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (for cleanup) and the bound port (port 0 picks a free one)."""
    runner = web.AppRunner(create_app(pipeline), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    # With port 0 the OS picked the port; the runner knows the bound addresses.
    bound = runner.addresses[0][1] if port == 0 and runner.addresses else port
    return runner, int(bound)
