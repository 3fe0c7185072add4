"""Protobuf schemas (the official CloudEvents format, the gateway service) and the gRPC wire contract.

The generated `*_pb2*.py` modules are committed; `regenerate.py` rebuilds them. The names below are
shared by `umcef.fabric.ingress.grpc_server` and `umcef.fabric.grpc_client`, which must agree on them.
"""

SERVICE = "umcef.v1.Gateway"
PUBLISH_METHOD = f"/{SERVICE}/Publish"
PUBLISH_BATCH_METHOD = f"/{SERVICE}/PublishBatch"

# Trailing metadata on a failed call, so clients can act without parsing the message text.
REASON_KEY = "umcef-reason"  # one of the REASON_* values
ATTRIBUTE_KEY = "umcef-attribute"  # the offending attribute, percent-encoded (metadata is ASCII)
INDEX_KEY = "umcef-index"  # the offending event's position in a batch
RETRY_AFTER_KEY = "umcef-retry-after-ms"  # with REASON_OVERLOADED

REASON_INVALID = "invalid"  # INVALID_ARGUMENT: fix the event, do not retry
REASON_LIMIT = "limit"  # RESOURCE_EXHAUSTED: a size/count limit, do not retry unchanged
REASON_OVERLOADED = "overloaded"  # RESOURCE_EXHAUSTED: backpressure, retry later
REASON_SHUTTING_DOWN = "shutting-down"  # UNAVAILABLE: retry, possibly elsewhere
