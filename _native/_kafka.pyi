# Type stub for the compiled twin (_kafka.pyx) of umcef.fabric.bindings.kafka._binary_headers.
from typing import Any

def binary_headers(attributes: dict[str, Any]) -> tuple[list[tuple[str, bytes]], int]: ...
