"""Runs `umcef serve` as a real subprocess (for crash and CLI tests) and finds its bound ports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

BANNER = re.compile(r"HTTP on http://[\d.]+:(\d+)")
DELIVERY_PID = re.compile(r"delivery in process (\d+)")


class GatewayProcess:
    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.delivery_pid: int | None = None  # `delivery.process: true`: the child running the workers
        self.startup_log = ""  # what it wrote to stderr up to its banner
        args = [sys.executable, "-m", "umcef.fabric.cli", "serve", "--port", "0", "--grpc-port", "0",
                "--data-dir", str(data_dir), *extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.port = self._wait_for_banner(deadline=time.monotonic() + 30)
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_for_banner(self, deadline: float) -> int:
        assert self.proc.stderr is not None
        seen = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            seen.append(line)
            child = DELIVERY_PID.search(line)  # printed just before the banner
            if child:
                self.delivery_pid = int(child.group(1))
            match = BANNER.search(line)
            if match:
                self.startup_log = "".join(seen)
                return int(match.group(1))
        self.proc.kill()
        raise RuntimeError("gateway did not start: " + "".join(seen))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)
