# ruff: noqa
# mypy: ignore-errors
from umcef.fabric.formats.proto import cloudevents_pb2 as _cloudevents_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PublishRequest(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: _cloudevents_pb2.CloudEvent
    def __init__(self, event: _Optional[_Union[_cloudevents_pb2.CloudEvent, _Mapping]] = ...) -> None: ...

class PublishBatchRequest(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: _cloudevents_pb2.CloudEventBatch
    def __init__(self, batch: _Optional[_Union[_cloudevents_pb2.CloudEventBatch, _Mapping]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("ids", "duplicates")
    IDS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    duplicates: int
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., duplicates: _Optional[int] = ...) -> None: ...
