"""Collects every backend's conformance target fixture."""

from tests.conformance.target_kafka import *  # noqa: F403
from tests.conformance.target_local import *  # noqa: F403
from tests.conformance.target_pubsub import *  # noqa: F403
from tests.conformance.target_servicebus import *  # noqa: F403
from tests.conformance.target_sqs import *  # noqa: F403
