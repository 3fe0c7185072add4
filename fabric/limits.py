"""Input limits shared by every ingress (HTTP, gRPC, sources)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request limits; 0 means unlimited."""

    max_body_bytes: int = 0
    max_batch: int = 0
    max_attributes: int = 0
    max_attribute_bytes: int = 0


NO_LIMITS = Limits()
# Longest a request's body (HTTP) or message (gRPC) may take to arrive once the request has begun: a client
# that announces a body and stalls must not hold its share of max_in_flight_bytes for ever.
BODY_READ_SECONDS = 30.0

DEFAULT_LIMITS = Limits(max_body_bytes=4 * 1024 * 1024, max_batch=1000, max_attributes=64, max_attribute_bytes=4096)
