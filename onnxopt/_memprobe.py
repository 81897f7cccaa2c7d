"""Child process for peak-memory measurement: load one model, run one batch, report VmHWM.

Run as ``python -m onnxopt._memprobe MODEL FEEDS.npz THREADS``; prints one JSON line. Memory is
measured in a fresh process because ONNX Runtime allocates outside Python's view, and a process
that already holds other sessions cannot attribute its peak to one of them. The feeds come from
the parent (same inputs as the timing) so the child never parses the model itself.
"""

from __future__ import annotations

import json
import sys


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main(argv: list[str]) -> None:
    path, feeds_path, threads = argv[0], argv[1], int(argv[2])
    import numpy as np
    import onnxruntime  # noqa: F401  (import cost belongs to the baseline)

    from onnxopt.runtime import make_session, run

    with np.load(feeds_path) as f:
        feeds = {k: f[k] for k in f.files}
    before = _status_kb("VmRSS")
    sess = make_session(path, "cpu", threads)
    run(sess, feeds)
    peak = _status_kb("VmHWM")
    print(json.dumps({"rss_before_kb": before, "hwm_kb": peak}))


if __name__ == "__main__":
    main(sys.argv[1:])
