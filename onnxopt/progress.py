"""Progress bars on stderr, only when a person is watching (stderr is a terminal)."""

from __future__ import annotations

import os
import sys


def progress(iterable=None, total=None, desc: str = "", unit: str = "it"):
    from tqdm.auto import tqdm

    quiet = not sys.stderr.isatty() or os.environ.get("ONNXOPT_NO_PROGRESS")
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=bool(quiet),
                leave=False, dynamic_ncols=True)
