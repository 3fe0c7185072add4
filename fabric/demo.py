"""`umcef demo`: a gateway on the embedded default, a realistic order/customer workload, what landed where."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from umcef.fabric import config as config_mod
from umcef.fabric.gateway import Gateway
from umcef.fabric.sdk import AsyncPublisher

DEMO_CONFIG: dict[str, Any] = {
    "destinations": {
        "customers": "local://customers",
        "orders": "local://orders",
        "payments": "local://payments",
        "shipping": "local://shipping",
        "audit": "local://audit",
    },
    "routes": [
        {"name": "customers", "filter": {"prefix": {"type": "com.example.customer."}}, "to": ["customers"]},
        {"name": "orders", "filter": {"prefix": {"type": "com.example.order."}}, "to": ["orders"]},
        {"name": "payments", "filter": {"prefix": {"type": "com.example.payment."}}, "to": ["payments"]},
        {"name": "shipping", "filter": {"exact": {"type": "com.example.order.shipped"}}, "to": ["shipping"]},
        {"name": "cancellations-audit", "filter": {"suffix": {"type": ".cancelled"}}, "to": ["audit"]},
    ],
}

SOURCE = "https://shop.example.com/checkout"
PRODUCTS = [("SKU-1001", "Espresso beans 1kg", 24.90), ("SKU-2002", "Milk frother", 59.00),
            ("SKU-3003", "Ceramic cup", 8.50), ("SKU-4004", "Grinder", 129.00), ("SKU-5005", "Descaler", 6.99)]
CITIES = [("Berlin", "DE"), ("Lisbon", "PT"), ("Austin", "US"), ("Osaka", "JP"), ("Lyon", "FR")]


def _event(kind: str, key: str, data: dict[str, Any], subject: str) -> dict[str, Any]:
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": SOURCE, "type": f"com.example.{kind}",
            "subject": subject, "partitionkey": key, "datacontenttype": "application/json", "data": data}


def workload(customers: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Per customer: created, maybe updated, then orders that are paid, confirmed, shipped or cancelled."""
    for c in range(customers):
        cid = f"cust-{c:05d}"
        city, country = rng.choice(CITIES)
        profile = {"customerId": cid, "name": f"Customer {c}", "email": f"c{c}@example.com",
                   "address": {"city": city, "country": country}}
        yield _event("customer.created", cid, profile, f"customers/{cid}")
        if rng.random() < 0.3:
            yield _event("customer.updated", cid, {**profile, "email": f"c{c}.new@example.com"}, f"customers/{cid}")
        for o in range(rng.randint(1, 3)):
            oid = f"ord-{c:05d}-{o}"
            picked = [(sku, name, rng.randint(1, 3), price)
                      for sku, name, price in rng.sample(PRODUCTS, rng.randint(1, 3))]
            lines = [{"sku": sku, "name": name, "qty": qty, "unitPrice": price} for sku, name, qty, price in picked]
            total = round(sum(qty * price for _, _, qty, price in picked), 2)
            order = {"orderId": oid, "customerId": cid, "lines": lines, "total": total, "currency": "EUR"}
            yield _event("order.placed", oid, order, f"orders/{oid}")
            if rng.random() < 0.15:
                yield _event("order.cancelled", oid, {"orderId": oid, "reason": "customer request"}, f"orders/{oid}")
                continue
            yield _event("payment.authorized", oid, {"orderId": oid, "amount": total, "method": "card"},
                         f"orders/{oid}")
            yield _event("order.confirmed", oid, {"orderId": oid}, f"orders/{oid}")
            yield _event("order.shipped", oid, {"orderId": oid, "carrier": "DHL",
                                                "tracking": f"JD{rng.randint(10**9, 10**10)}"}, f"orders/{oid}")


async def run_demo(data_dir: Path, customers: int, batch_size: int, console: Console) -> None:
    config = config_mod.from_mapping(
        {**DEMO_CONFIG, "data_dir": str(data_dir), "server": {"port": 0, "grpc_port": 0}}, "demo")
    gateway = Gateway(config)
    endpoints = await gateway.start()
    url = f"http://127.0.0.1:{endpoints.http_port}"
    console.print(f"[bold]UMCEF demo[/] gateway on {url} (gRPC :{endpoints.grpc_port}), "
                  f"embedded store in [cyan]{data_dir}[/]")
    events = list(workload(customers, random.Random(7)))
    started = time.perf_counter()
    try:
        async with AsyncPublisher(url=url) as publisher:
            with Progress(TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console) as progress:
                task = progress.add_task("publish", total=len(events))
                # The first events go one by one in binary mode, the rest in batches, as services would.
                for event in events[:20]:
                    await publisher.publish(event)
                    progress.advance(task)
                for i in range(20, len(events), batch_size):
                    chunk = events[i:i + batch_size]
                    await publisher.publish_batch(chunk)
                    progress.advance(task, len(chunk))
        elapsed = time.perf_counter() - started
        console.print(f"published {len(events)} events in {elapsed:.2f} s "
                      f"({len(events) / elapsed:,.0f} events/s, each durable before its 202)")
        await _show_guarantees(url, events[0], console)
        _show_landing(gateway, console)
    finally:
        await gateway.stop()


async def _show_guarantees(url: str, first: dict[str, Any], console: Console) -> None:
    async with httpx.AsyncClient(base_url=url) as client:
        again = await client.post("/v1/events", json=first,
                                  headers={"content-type": "application/cloudevents+json"})
        console.print(f"re-publishing event {first['id'][:8]}… → {again.status_code} "
                      f"duplicates={again.json()['duplicates'] != []} (deduplicated on source+id, not stored twice)")
        bad = {k: v for k, v in first.items() if k != "source"}
        rejected = await client.post("/v1/events", json=bad,
                                     headers={"content-type": "application/cloudevents+json"})
        problem = rejected.json()
        console.print(f"an event without 'source' → {rejected.status_code} {problem['title']}: {problem['detail']}")


def _show_landing(gateway: Gateway, console: Console) -> None:
    table = Table(title="What landed where (embedded store)")
    table.add_column("destination")
    table.add_column("events", justify="right")
    table.add_column("types")
    for name, dest in gateway.config.destinations.items():
        stored = gateway.store.read(dest.topic, limit=100_000)
        types = sorted({_type_of(e.payload) for e in stored})
        table.add_row(f"{name} ({dest.url})", str(len(stored)), ", ".join(t.rsplit(".", 2)[-2] + "." +
                                                                           t.rsplit(".", 1)[-1] for t in types))
    console.print(table)
    console.print(f"inspect them: [bold]umcef tail --data-dir {gateway.config.data_dir} --topic orders "
                  "--from-beginning --no-follow[/]")


def _type_of(payload: bytes) -> str:
    import orjson

    return str(orjson.loads(payload)["type"])


def main(data_dir: Path, customers: int = 200, batch_size: int = 100) -> None:
    asyncio.run(run_demo(data_dir, customers, batch_size, Console()))
