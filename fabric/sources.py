"""Sources: a broker topic, queue or subscription feeding the pipeline exactly like HTTP ingress does.

Each consumed event is acknowledged to its broker only after the pipeline made it durable
(at-least-once); under backpressure it is handed back with a delay rather than dropped. A consume that
fails (the broker down when the gateway starts, the topic not created yet, credentials refused) is started
again with backoff until the gateway stops, as a delivery worker retries its broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from umcef.adapters.contract import Adapter, Delivery
from umcef.fabric.deadletter import DeadLetterQueue
from umcef.fabric.delivery import RetryPolicy
from umcef.fabric.errors import EventError
from umcef.fabric.pipeline import Overloaded, Pipeline, ShuttingDown

log = logging.getLogger("umcef.sources")
# Waits before consuming again: the delivery workers' full-jitter backoff, from 0.5 s doubling up to 30 s.
RESTART = RetryPolicy(base_seconds=0.5, cap_seconds=30.0)


class SourceRunner:
    def __init__(self, name: str, adapter: Adapter, pipeline: Pipeline, dead_letters: DeadLetterQueue,
                 max_in_flight: int = 64) -> None:
        self.name = name
        self.dead_letters = dead_letters
        self.adapter = adapter
        self.pipeline = pipeline
        self.max_in_flight = max_in_flight
        self.accepted = 0
        self.restarts = 0  # consumes started again after a failure
        self._stopping = asyncio.Event()

    async def handle(self, delivery: Delivery) -> None:
        try:
            await self.pipeline.publish([delivery.event])
        except Overloaded as exc:
            await delivery.nack(requeue_after=exc.retry_after)
            return
        except ShuttingDown:
            await delivery.nack(requeue_after=0)
            return
        except EventError as exc:
            # Adapters decode and validate, so this is an event the pipeline's limits refuse: it can never
            # pass, and redelivering it forever would block the source. It goes to the dead-letter queue.
            await self.dead_letters.put(delivery.event, f"refused by the pipeline: {exc}",
                                        destination=f"source:{self.name}", attempts=delivery.attempt)
        else:
            self.accepted += 1
        await delivery.ack()

    async def run(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            started = loop.time()
            try:
                await self.adapter.consume(self.handle, max_in_flight=self.max_in_flight)
                why = "consuming ended"
            except Exception as exc:  # any failure: the source must outlive its broker's, like delivery does
                why = f"{type(exc).__name__}: {exc}"
            if self._stopping.is_set():
                return
            if loop.time() - started > RESTART.cap_seconds:
                failures = 0  # it had been consuming: a new failure, not the same one again
            delay = RESTART.backoff(failures)
            failures += 1
            log.warning("source %s: %s; consuming again in %.1f s", self.name, why, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            self.restarts += 1

    async def stop(self) -> None:
        self._stopping.set()
        await self.adapter.stop_consuming()
