"""A `umcef serve` subprocess for chaos tests: tests/gateway_process.GatewayProcess plus a thread that keeps
reading its stderr after the banner (a gateway logging retries must never block on a full pipe), and the
last lines of that log for failure messages."""

from __future__ import annotations

import asyncio
import collections
import threading
from pathlib import Path
from typing import Any

import yaml

from tests.gateway_process import GatewayProcess


class ChaosGateway(GatewayProcess):
    def __init__(self, data_dir: Path, config: Path) -> None:
        super().__init__(data_dir, "--config", str(config))
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def tail(self) -> str:
        return "".join(self.log)

    @classmethod
    async def astart(cls, data_dir: Path, config: Path) -> ChaosGateway:
        return await asyncio.to_thread(cls, data_dir, config)


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path
