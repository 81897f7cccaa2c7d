"""Record the feeds a running pipeline gives ONNX Runtime, as ``--data`` for onnxopt.

Real inputs beat random ones: a text recogniser sees lines of different widths, a VAD carries
its recurrent state and a sample rate, a detector sees letterboxed images. Wrap the package's own
pipeline once and every ``InferenceSession.run`` call of the chosen model becomes one sample::

    from onnxopt.record import record_feeds

    with record_feeds("det-feeds.npz", model="det.onnx", max_samples=32):
        my_pipeline("page.png")          # calls InferenceSession(...).run(...) inside

    # onnxopt quantize det.onnx -o det-int8.onnx --data det-feeds.npz

The file is a pickle-free ``.npz`` (:func:`onnxopt.feeds.save_samples`): keys
``sample0000/<input name>``, one sample per prefix, any shapes per sample (scalars included).
It is written when the ``with`` block ends, atomically, also when the pipeline raised.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from .feeds import save_samples

__all__ = ["record_feeds", "Recording"]


class Recording:
    """What :func:`record_feeds` yields: the samples so far (``samples``) and where they go."""

    def __init__(self, path: str | os.PathLike, model, max_samples: int):
        self.path = Path(path)
        self.model = model
        self.max_samples = int(max_samples)
        self.samples: list[dict[str, np.ndarray]] = []
        self.skipped = 0

    def wants(self, session) -> bool:
        if self.model is None:
            return True
        own = getattr(session, "_model_path", None)
        if own is None:
            return False
        want = Path(self.model)
        try:
            return Path(own).resolve() == want.resolve() or (len(want.parts) == 1 and Path(own).name == want.name)
        except OSError:
            return False

    def add(self, feeds: dict) -> None:
        if len(self.samples) >= self.max_samples:
            self.skipped += 1
            return
        # Copies: a pipeline may reuse its buffers between calls.
        self.samples.append({str(k): np.array(v, copy=True) for k, v in feeds.items()})


@contextlib.contextmanager
def record_feeds(path: str | os.PathLike, model: str | os.PathLike | None = None, max_samples: int = 32):
    """Record each ``onnxruntime.InferenceSession.run`` call's feeds (of the session whose model
    file is ``model``; a bare file name matches by name; None = every session) into ``path``.
    At most ``max_samples`` calls are kept (the first ones). Sessions built from bytes have no
    path and are matched only by ``model=None``."""
    import onnxruntime as ort

    if int(max_samples) < 1:
        raise ValueError("max_samples must be >= 1")
    rec = Recording(path, model, max_samples)
    original = ort.InferenceSession.run

    def run(self, output_names, input_feed, run_options=None):
        if rec.wants(self):
            rec.add(input_feed)
        return original(self, output_names, input_feed, run_options)

    ort.InferenceSession.run = run
    try:
        yield rec
    finally:
        ort.InferenceSession.run = original
        if rec.samples:
            save_samples(rec.path, rec.samples)
