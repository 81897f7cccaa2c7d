"""onnxopt's CLI on the real-world corpus, judged by each package's own pipeline: every command
either writes a variant that the pipeline answers the same with, or refuses in one line (exit 2
for the input, 3 for a gate), never a traceback. The full matrix (every command, timings, ORT's
plain quantizers beside) is benchmarks/realworld.py; CI runs the default `quantize` and
`simplify`, the two commands a new user tries first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from realworld import corpus

ROOT = Path(__file__).resolve().parents[2]

# Known, open: none. (ORT's quantizer used to leave silero-vad-op15's If before the producer of
# the value its branches read; passes._ort.via_ort now sorts such graphs.)
KNOWN: dict[tuple[str, str], str] = {}


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxopt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
@pytest.mark.parametrize("command", ["quantize", "simplify"])
@pytest.mark.parametrize("key", corpus.keys())
def test_command_is_right_or_refuses(key, command, realworld_cache, tmp_path):
    entry = corpus.by_key(key)
    if not entry.available():
        pytest.skip(f"{entry.package} is not installed (pip install -e \".[realworld]\")")
    if (key, command) in KNOWN:
        pytest.xfail(KNOWN[(key, command)])
    npz = corpus.recorded(key, realworld_cache)
    out = tmp_path / "out" / "variant.onnx"
    out.parent.mkdir()
    cwd = tmp_path / "cwd"  # onnxopt (and the ORT tools it calls) must leave nothing in the cwd
    cwd.mkdir()
    p = _cli(command, entry.path(), "--data", npz, "-o", out, cwd=cwd)
    assert not list(cwd.iterdir()), f"files left in the working directory: {sorted(cwd.iterdir())}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.returncode in (0, 2, 3), p.stderr[-3000:]
    if p.returncode == 0:
        verdict = entry.check(out)
        assert verdict["ok"], f"exit 0 but the pipeline's answer changed: {verdict['detail']}"
    else:
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and len(lines[0]) < 600, p.stderr[-2000:]
        assert not out.exists()  # a refused or rejected variant never takes the -o name
