"""numpy, or None when the device lacks it (require_modules() then reports it with its exit code)."""

try:
    import numpy as np
except ImportError:  # pragma: no cover - reported by inputs.require_modules()
    np = None

__all__ = ["np"]
