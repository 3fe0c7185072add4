"""Collects every backend's conformance target fixture."""

from tests.conformance.target_local import *  # noqa: F403
