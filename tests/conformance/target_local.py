"""Conformance target: the embedded store (`local://`)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.targets import Entity, Target
from umcef.adapters.local import LocalStore

__all__ = ["target_local"]


@pytest.fixture
def target_local(tmp_path: Path) -> Target:
    directory = tmp_path / "store"
    LocalStore(directory).close()  # `umcef serve` creates the store; adapters open an existing one

    async def new_entity(ordered: bool = False, **_: Any) -> Entity:
        topic = f"conf{uuid.uuid4().hex[:8]}"
        return Entity(f"local://{topic}?dir={directory}", f"local://{topic}?dir={directory}&group=conformance")

    def missing_entity() -> Entity:
        absent = tmp_path / "absent"
        absent.mkdir(exist_ok=True)
        return Entity(f"local://t?dir={absent}", f"local://t?dir={absent}")

    def unreachable_url() -> str:
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("x")
        return f"local://t?dir={blocker}/store"

    return Target("local", new_entity, missing_entity, unreachable_url, redelivery_seconds=0.0)
