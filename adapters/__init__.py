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
    adapter: Adapter = _backend(url).from_url(url, **options)
    return adapter


def check_url(url: str, **options: Any) -> None:
    """Raises the ValueError or TypeError `open_adapter` would for this URL and these options, opening nothing:
    so a configuration is refused when it is loaded (and by `umcef config check`), not when the gateway starts.
    Each backend module exposes `check_url(url, **options)`."""
    _backend(url).check_url(url, **options)


def _backend(url: str) -> Any:
    scheme = urlsplit(url).scheme.lower()
    module_name = BACKENDS.get(scheme)
    if module_name is None:
        raise ValueError(f"unknown destination scheme in {url!r}; expected one of "
                         + ", ".join(s + "://" for s in BACKENDS))
    return importlib.import_module(f"umcef.adapters.{module_name}")
