"""Sources: a broker topic, queue or subscription feeding the pipeline exactly like HTTP ingress does.

Each consumed event is acknowledged to its broker only after the pipeline made it durable
(at-least-once); under backpressure it is handed back with a delay rather than dropped.
"""

from __future__ import annotations

from umcef.adapters.contract import Adapter, Delivery
from umcef.fabric.deadletter import DeadLetterQueue
from umcef.fabric.errors import EventError
from umcef.fabric.pipeline import Overloaded, Pipeline, ShuttingDown


class SourceRunner:
    def __init__(self, name: str, adapter: Adapter, pipeline: Pipeline, dead_letters: DeadLetterQueue,
                 max_in_flight: int = 64) -> None:
        self.name = name
        self.dead_letters = dead_letters
        self.adapter = adapter
        self.pipeline = pipeline
        self.max_in_flight = max_in_flight
        self.accepted = 0

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
        await self.adapter.consume(self.handle, max_in_flight=self.max_in_flight)

    async def stop(self) -> None:
        await self.adapter.stop_consuming()
