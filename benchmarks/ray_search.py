"""The search's wall time locally and on Ray with 1 and 2 worker CPUs, on built-in models.

Run from the repository root:  .venv/bin/python benchmarks/ray_search.py [--models digits-cnn,minilm]
Writes benchmarks/results/ray_search.{md,json}. For each model: the fp32 file is exported once,
then `onnxopt optimize FILE <gate> --executor E` runs with E = local, then a fresh
`ray start --head --num-cpus N` cluster for N = 1 and 2 (token auth, 127.0.0.1), each a child
process. Build time is the report's ``build_seconds`` (candidates built and gated: the part Ray
fans out); the timing of the survivors always runs in the driver, serially. Each configuration
must choose the same variant with the same variant bytes as the local run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import without_machine_paths, write_results  # noqa: E402

GATES = {"digits-cnn": ["--max-drop", "0.5"], "minilm": ["--min-cosine", "0.99"],
         "mobilenet_v2": ["--min-agreement", "0.9"]}
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    """A free port outside Ray's worker ports (10002-19999) and its fixed defaults (52365 and up)."""
    import random

    for port in random.Random().sample(range(21000, 30000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 21000-29999")


def cli(args: list[str], env: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "onnxopt.cli", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode not in (0, 3):
        raise SystemExit(f"onnxopt {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return (json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}), wall


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted((out / "variants").glob("*.onnx"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-cnn,minilm")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONNXOPT_NO_PROGRESS": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-ray-") as tmp:
        work = Path(tmp)
        for m in a.models.split(","):
            src = work / f"{m}.onnx"
            subprocess.run([sys.executable, "-m", "onnxopt.cli", "export", m, "-o", str(src)], check=True,
                           capture_output=True, env=env)
            base = [str(src), *GATES[m], "--batch", "1", "--duration", "1", "--no-memory", "--no-torch", "--json"]
            ref = None
            for executor, cpus in (("local", None), ("ray", 1), ("ray", 2)):
                out = work / f"{m}-{executor}-{cpus}"
                args = ["optimize", *base, "-o", str(out)]
                if cpus:
                    port = _free_port()
                    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                                    f"--num-cpus={cpus}", "--include-dashboard=false", "--disable-usage-stats",
                                    "--object-store-memory=300000000"], check=True, capture_output=True, env=env)
                    args += ["--executor", f"ray:127.0.0.1:{port}"]
                try:
                    report, wall = cli(args, env)
                finally:
                    if cpus:
                        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)
                d = digests(out)
                ref = ref or d
                rows.append({"model": m, "executor": executor, "worker_cpus": cpus, "wall_s": round(wall, 1),
                             "build_s": report.get("build_seconds"), "candidates": len(report.get("variants", [])),
                             "worker_pids": len({v["ran_in"]["pid"] for v in report.get("variants", []) if "ran_in" in v}),
                             "chosen": report.get("chosen"), "same_bytes_as_local": d == ref})
                print(rows[-1], flush=True)
    result = without_machine_paths({"rows": rows, "cpus": os.cpu_count(),
                                    "made_by": "python benchmarks/ray_search.py " + " ".join(sys.argv[1:])})
    write_results("ray_search", result, markdown(result))


def markdown(r: dict) -> str:
    lines = ["# The search on Ray: 1 vs 2 worker CPUs", "", f"Made by `{r['made_by']}` on a {r['cpus']}-core "
             "machine (one run each; the driver also times the survivors, serially, after the build).", "",
             "| model | executor | worker CPUs | candidates | worker processes | build s | wall s | chosen | same bytes as local |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['model']} | {x['executor']} | {x['worker_cpus'] or '-'} | {x['candidates']} | "
                     f"{x['worker_pids'] or '-'} | {x['build_s']} | {x['wall_s']} | {x['chosen']} | "
                     f"{'yes' if x['same_bytes_as_local'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
