"""Picks the compiled hot paths from `umcef._native` when built, else their pure-Python twins.

`UMCEF_PURE=1` forces the pure path (the test suite runs both ways).
"""

from __future__ import annotations

import os

from umcef.fabric import validation as _pure_validation

PURE_REQUESTED = os.environ.get("UMCEF_PURE", "") == "1"

validate_attributes = _pure_validation.validate_attributes
NATIVE = False
if not PURE_REQUESTED:
    try:
        from umcef._native._validate import validate_attributes  # type: ignore[no-redef]

        NATIVE = True
    except ImportError:  # not built on this machine: the pure twin is complete
        pass
