"""Run the Service Bus TEST DOUBLE (`tests/servicebus_broker`) in its own process, for `bench/adapters.py`.

The double normally runs in a thread of the test process. For a benchmark that would make the broker
and the client SDK (both pure Python) share one GIL, so it runs here instead, like a real broker would:

    python bench/_servicebus_double.py      # from the repo root
    -> prints "READY <connection string>", then reads commands on stdin, one per line:
       "queue NAME"   creates a plain queue, answers "OK" (or "ERR <reason>")
    EOF on stdin (the parent exits or closes the pipe) stops the broker.

It is still the test double: its figures say what our adapter and the SDK cost, not what Azure does.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from tests.servicebus_broker import ServiceBusTestBroker  # noqa: E402


def main() -> None:
    broker = ServiceBusTestBroker().start()
    try:
        print(f"READY {broker.connection_string}", flush=True)
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            try:
                if command == "queue":
                    broker.create_queue(arg, lock_duration=30.0)
                else:
                    raise ValueError(f"unknown command {command!r}")
            except Exception as exc:  # report, keep serving
                print(f"ERR {type(exc).__name__}: {exc}", flush=True)
            else:
                print("OK", flush=True)
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
