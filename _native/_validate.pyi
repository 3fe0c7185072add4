# Type stub for the compiled twin of umcef.fabric.validation.validate_attributes.
from typing import Any

def validate_attributes(attrs: dict[str, Any], max_attributes: int = 0, max_value_bytes: int = 0) -> None: ...
