"""INT4 vs INT8 vs fp32 on MiniLM and big-encoder in one table, and what the search picks.

Run from the repository root, after benchmarks/scale.py (big-encoder) and
benchmarks/scale.py --model minilm --external-data --out-name scale-minilm:
    .venv/bin/python benchmarks/scale_search.py [--big-model PATH/TO/big-encoder.onnx]

The table's figures come from those two runs (one interleaved bench per model: seq 128, batch 1
and 8, 2 threads, fp32 / a copy of it / dynamic INT8 / INT4; cosine on the 64 built-in
sentences). Then `onnxopt optimize MODEL --min-cosine 0.99` runs on each model (a fresh process:
wall time and peak RSS recorded) and its choice is added. ``--big-model`` takes an exported
big-encoder (e.g. a kept ``scale.py --work`` folder's fp32/model.onnx) instead of exporting it
again. Writes benchmarks/results/scale_search.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import RESULTS, without_machine_paths, write_results  # noqa: E402


def optimize(model: str, out: Path, duration: float) -> dict:
    args = ["optimize", model, "--min-cosine", "0.99", "--batch", "1,8", "--seq-len", "128", "--threads", "2",
            "--duration", str(duration), "-o", str(out), "--json"]
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "onnxopt.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(p.pid, 0)
    rec = {"command": "onnxopt " + " ".join(a if a != str(out) else "OUT" for a in args),
           "exit": os.waitstatus_to_exitcode(status), "seconds": round(time.perf_counter() - t0, 1),
           "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    rec["chosen"] = report.get("chosen")
    rec["why"] = report.get("why")
    rec["variants"] = [{k: v.get(k) for k in ("name", "status", "speedup", "cosine_mean", "cosine_min", "bytes")}
                       for v in report.get("variants", [])]
    print(json.dumps({k: rec[k] for k in ("command", "exit", "seconds", "peak_rss_mb", "chosen")}), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-model", help="an exported big-encoder .onnx (default: export it)")
    ap.add_argument("--duration", type=float, default=4.0)
    a = ap.parse_args()
    runs = {"minilm": json.loads((RESULTS / "scale-minilm.json").read_text()),
            "big-encoder": json.loads((RESULTS / "scale.json").read_text())}
    work = Path(tempfile.mkdtemp(prefix="onnxopt-scale-search-"))
    try:
        searches = {"minilm": optimize("minilm", work / "minilm", a.duration),
                    "big-encoder": optimize(a.big_model or "big-encoder", work / "big", a.duration)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.big_model:
        searches["big-encoder"]["command"] = searches["big-encoder"]["command"].replace(a.big_model, "big-encoder.onnx")
    result = without_machine_paths({"table_from": ["scale-minilm.json", "scale.json"], "searches": searches,
                                    "made_by": "python benchmarks/scale_search.py" + (" --big-model big-encoder.onnx"
                                                                                       if a.big_model else "")})
    lines = ["# INT4 vs INT8 vs fp32, MiniLM and big-encoder", "",
             f"Made by `{result['made_by']}`. Size, latency and cosine from `benchmarks/results/scale-minilm.md` and "
             "`scale.md` (one interleaved bench per model: seq 128, 2 threads, spinning off; cosine of the sentence "
             "embeddings against fp32 on the 64 built-in sentences); the pick from `onnxopt optimize MODEL "
             "--min-cosine 0.99` (a fresh process each).", "",
             "| model | variant | size vs fp32 | b1 vs fp32 | b8 vs fp32 | mean cos | min cos | search |",
             "|---|---|---|---|---|---|---|---|"]
    for model, run in runs.items():
        fp32 = next(v["mb"] for v in run["variants"] if v["variant"] == "fp32")
        pick = searches[model]["chosen"]
        for v in run["variants"]:
            kind = ("INT8" if "INT8" in v["variant"] else "INT4" if "INT4" in v["variant"] else None)
            chosen = "picked" if pick and kind and kind in pick.upper() else ""
            x = (lambda k: f"{v[k]:.2f}x" if v.get(k) is not None else "-")
            lines.append(f"| {model} | {v['variant']} | {v['mb'] / fp32:.3f} | {x('b1_speedup')} | {x('b8_speedup')} | "
                         f"{v.get('cosine_mean', '-')} | {v.get('cosine_min', '-')} | {chosen} |")
    lines += ["", "| search | exit | wall s | peak RSS MB | chosen | why |", "|---|---|---|---|---|---|"]
    for model, s in searches.items():
        lines.append(f"| `{s['command']}` | {s['exit']} | {s['seconds']} | {s['peak_rss_mb']} | {s['chosen']} | "
                     f"{s['why']} |")
    lines += ["", "Candidates each search judged (status after the gates; speed-up at batch 1 against its reference):",
              ""]
    for model, s in searches.items():
        lines.append(f"- {model}: " + "; ".join(
            f"{v['name']} {v['status']}" + (f" {v['speedup']:.2f}x" if v.get("speedup") else "")
            + (f" cos {v['cosine_mean']:.4f}" if v.get("cosine_mean") is not None else "") for v in s["variants"]))
    write_results("scale_search", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
