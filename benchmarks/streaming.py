"""Calibration from a big image folder: static INT8 of mobilenet calibrated on N images, the peak
memory of the `onnxopt quantize` process, with the folder decoded to disk and read a batch at a time.

Run from the repository root:
    .venv/bin/python benchmarks/streaming.py                      # 10,000 images
    .venv/bin/python benchmarks/streaming.py --images 2000 --before <git-rev>

``--before REV`` also runs the same command with onnxopt at REV (a git worktree of it) on the same
folder, one after the other, for the side-by-side figure. The images are random-noise JPEGs of
256 x 256 (generated, seeded; decoded they are 0.6 MB each at 224 x 224 float32). Peak RSS is the
child's ``ru_maxrss`` (``os.wait4``). Writes benchmarks/results/streaming.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import without_machine_paths, write_results  # noqa: E402


def images(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=85)


def run(code: Path, args: list[str], cwd: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "onnxopt.cli", *args]
    t0 = time.perf_counter()
    with open(cwd / "log.txt", "a") as out:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHONPATH": str(code)})
        _, status, usage = os.wait4(p.pid, 0)
    rec = {"exit": os.waitstatus_to_exitcode(status), "seconds": round(time.perf_counter() - t0, 1),
           "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    print(rec, flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--before", help="also run onnxopt at this git revision")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxopt-streaming-"))
    try:
        env = {**os.environ, "ONNXOPT_CACHE_DIR": str(work / "cache")}
        subprocess.run([sys.executable, "-m", "onnxopt.cli", "export", "mobilenet_v2", "-o", "fp32.onnx"], cwd=work,
                       env={**env, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
        t0 = time.perf_counter()
        images(work / "imgs", a.images)
        made = round(time.perf_counter() - t0, 1)
        args = ["quantize", "fp32.onnx", "--mode", "static", "--data", "imgs", "-o", "q.onnx", "--min-cosine", "0.5",
                "--max-channel-error", "100", "--no-speed-check"]
        decoded_mb = round(a.images * 3 * 224 * 224 * 4 / 2**20)
        rows = []
        if a.before:
            old = work / "before"
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), a.before], cwd=ROOT, check=True)
            try:
                rows.append({"onnxopt": f"before ({a.before})", **run(old, args, work, env)})
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
            (work / "q.onnx").unlink(missing_ok=True)
        rows.append({"onnxopt": "this tree, first run (decodes to disk)", **run(ROOT, args, work, env)})
        (work / "q.onnx").unlink(missing_ok=True)
        rows.append({"onnxopt": "this tree, second run (decoded cache)", **run(ROOT, args, work, env)})
        result = {"images": a.images, "decoded_mb": decoded_mb, "generate_seconds": made,
                  "command": "onnxopt " + " ".join(args), "runs": rows,
                  "made_by": "python benchmarks/streaming.py " + " ".join(sys.argv[1:])}
        result = without_machine_paths(result, str(work))
        lines = [f"# Calibration from a folder of {a.images} images", "",
                 f"Made by `{result['made_by']}` (one run). `{result['command']}` on mobilenet_v2 (224 x 224): "
                 f"the images decoded are {decoded_mb} MB of float32.", "",
                 "| onnxopt | exit | wall s | peak RSS MB | peak vs decoded images |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['onnxopt']} | {r['exit']} | {r['seconds']} | {r['peak_rss_mb']} | "
                         f"{r['peak_rss_mb'] / decoded_mb:.2f}x |")
        write_results("streaming", result, "\n".join(lines) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
