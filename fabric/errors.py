"""Typed errors for bad input; the HTTP and gRPC edges map them to status codes."""

from __future__ import annotations


class EventError(ValueError):
    """Input that is not an acceptable CloudEvent. `attribute` names the culprit when there is one."""

    def __init__(self, reason: str, attribute: str | None = None, index: int | None = None) -> None:
        self.reason = reason
        self.attribute = attribute
        self.index = index
        super().__init__(self.describe())

    def describe(self) -> str:
        where = f"event[{self.index}]: " if self.index is not None else ""
        what = f"attribute '{self.attribute}': " if self.attribute else ""
        return f"{where}{what}{self.reason}"

    def at(self, index: int) -> EventError:
        """The same error, located inside a batch."""
        return type(self)(self.reason, self.attribute, index)


class InvalidAttribute(EventError):
    """A context attribute is missing, mistyped or malformed."""


class InvalidData(EventError):
    """The `data` / `data_base64` members are inconsistent or undecodable."""


class MalformedBody(EventError):
    """The body cannot be parsed at all (broken JSON, truncated protobuf)."""


class UnsupportedMediaType(EventError):
    """The request is not a CloudEvent in any mode or format we accept."""


class LimitExceeded(EventError):
    """A configured size or count limit was crossed."""
