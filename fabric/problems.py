"""RFC 9457 problem details for every way a publish can fail."""

from __future__ import annotations

from typing import Any

from umcef.fabric.errors import (
    EventError,
    InvalidAttribute,
    InvalidData,
    LimitExceeded,
    MalformedBody,
    UnsupportedMediaType,
)

PROBLEM_CONTENT_TYPE = "application/problem+json"
_BASE = "https://umcef.dev/problems/"


def problem(status: int, slug: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": _BASE + slug, "title": title, "status": status, "detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def for_event_error(exc: EventError, binary_mode: bool) -> dict[str, Any]:
    """400 for unparseable input and bad binary-mode headers; 422 for valid JSON that is no valid event."""
    extra = {"attribute": exc.attribute, "index": exc.index}
    if isinstance(exc, UnsupportedMediaType):
        return problem(415, "unsupported-media-type", "Unsupported media type", exc.describe())
    if isinstance(exc, LimitExceeded):
        return problem(413, "limit-exceeded", "Request too large", exc.describe(), **extra)
    if isinstance(exc, MalformedBody):
        return problem(400, "malformed", "Malformed request body", exc.describe(), **extra)
    if isinstance(exc, InvalidData):
        return problem(400 if binary_mode else 422, "invalid-data", "Invalid event data", exc.describe(), **extra)
    if isinstance(exc, InvalidAttribute) and binary_mode:
        return problem(400, "invalid-attribute", "Invalid event attribute", exc.describe(), **extra)
    return problem(422, "invalid-event", "Invalid event", exc.describe(), **extra)
