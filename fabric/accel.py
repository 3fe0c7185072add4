"""Picks the compiled hot paths from `umcef._native` when built, else their pure-Python twins.

`UMCEF_PURE=1` forces the pure path (the test suite runs both ways).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from umcef.fabric import validation as _pure_validation

PURE_REQUESTED = os.environ.get("UMCEF_PURE", "") == "1"


def _native(name: str) -> ModuleType | None:
    if PURE_REQUESTED:
        return None
    try:
        return importlib.import_module(f"umcef._native.{name}")
    except ImportError:  # not built on this machine: the pure twin is complete
        return None


_validate = _native("_validate")
NATIVE = _validate is not None
validate_attributes = _validate.validate_attributes if _validate is not None else _pure_validation.validate_attributes

# The compiled router decision (router/decide.py selects it per table; `Router(..., native=False)` is the
# pure reference). Imported lazily by `umcef._native._router` itself, so importing it here is safe.
router_native = _native("_router")
ROUTER_NATIVE = router_native is not None
