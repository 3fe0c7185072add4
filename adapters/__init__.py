"""Broker adapters behind one contract (`umcef.adapters.contract`), opened by destination URL.

`open_adapter("kafka://127.0.0.1:9092/orders")` imports the backend module lazily, so a gateway only
needs the client libraries of the brokers it actually uses (the `kafka`, `sqs`, ... extras).
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from umcef.adapters.contract import Adapter

BACKENDS = {"local": "local_adapter", "kafka": "kafka", "sqs": "sqs", "pubsub": "pubsub", "servicebus": "servicebus"}


def open_adapter(url: str, **options: Any) -> Adapter:
    """An adapter for `url`; each backend module exposes `from_url(url, **options)`."""
    scheme = urlsplit(url).scheme.lower()
    module_name = BACKENDS.get(scheme)
    if module_name is None:
        raise ValueError(f"unknown destination scheme in {url!r}; expected one of "
                         + ", ".join(s + "://" for s in BACKENDS))
    module = importlib.import_module(f"umcef.adapters.{module_name}")
    adapter: Adapter = module.from_url(url, **options)
    return adapter
