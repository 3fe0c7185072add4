"""Assembles a running gateway from a `Config`: store, pipeline, HTTP and gRPC ingress."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

from umcef.adapters.local import LocalStore, Retention
from umcef.fabric.config import Config
from umcef.fabric.dedup import DedupWindow
from umcef.fabric.ingress.http_server import start_http_server
from umcef.fabric.pipeline import LocalSpool, Pipeline
from umcef.router.static import Route, StaticRouter, compile_filter

log = logging.getLogger("umcef.gateway")


def build_router(config: Config) -> StaticRouter:
    routes = [
        Route(r.name, compile_filter(r.filter) if r.filter is not None else (lambda _e: True), r.to)
        for r in config.routes
    ]
    return StaticRouter(routes, (config.default_destination,))


def open_store(config: Config) -> LocalStore:
    retention = Retention(config.store.max_age_seconds, config.store.max_events_per_topic)
    return LocalStore(config.data_dir, sync=config.store.sync, retention=retention)  # type: ignore[arg-type]


def build_pipeline(config: Config, store: LocalStore) -> Pipeline:
    topics = {name: d.target for name, d in config.destinations.items() if d.scheme == "local"}
    return Pipeline(
        DedupWindow(config.dedup.window_seconds, config.dedup.max_entries),
        build_router(config),
        LocalSpool(store, topics),
        config.limits,
    )


@dataclass
class Endpoints:
    http_port: int
    grpc_port: int | None


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = open_store(config)
        self.pipeline = build_pipeline(config, self.store)
        self._http: Any = None
        self._grpc: Any = None
        self.endpoints = Endpoints(0, None)

    async def start(self) -> Endpoints:
        server = self.config.server
        self._http, http_port = await start_http_server(self.pipeline, server.host, server.port)
        grpc_port = None
        if server.grpc_port is not None:
            from umcef.fabric.ingress.grpc_server import start_grpc_server

            self._grpc, grpc_port = await start_grpc_server(
                self.pipeline, server.host, server.grpc_port, self.config.limits)
        self.endpoints = Endpoints(http_port, grpc_port)
        return self.endpoints

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight publishes finish (they are durable on return), close the store."""
        self.pipeline.closing = True
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._http is not None:
            await self._http.cleanup()
        self.store.close()

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await self.stop()
