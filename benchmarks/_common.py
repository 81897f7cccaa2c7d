"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so importable)."""

from __future__ import annotations

import json


def without_temp_paths(obj, tmp: str):
    """The results with the temp folder the models lived in cut out of every string, so committed
    results name models, not one machine's temp paths."""
    prefix = str(tmp).rstrip("/") + "/"
    return json.loads(json.dumps(obj, default=str).replace(prefix, ""))
