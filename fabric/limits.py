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
DEFAULT_LIMITS = Limits(max_body_bytes=4 * 1024 * 1024, max_batch=1000, max_attributes=64, max_attribute_bytes=4096)
