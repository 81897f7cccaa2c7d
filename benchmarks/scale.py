"""A model over 2 GiB end to end: export -> quantize (dynamic INT8, INT4) -> bench -> pack ->
verify-bundle, and prune, each step a fresh `onnxopt` process whose wall time and peak RSS are recorded.

Run from the repository root:
    .venv/bin/python benchmarks/scale.py                       # big-encoder (XLM-R large, 2.2 GB)
    .venv/bin/python benchmarks/scale.py --model minilm --external-data --out-name scale-minilm

Writes benchmarks/results/<out-name>.{md,json}. Peak memory is the child's ``ru_maxrss`` (from
``os.wait4``: the process's own high-water mark, ONNX Runtime's allocations included). The bench
step interleaves fp32, a byte copy of fp32 (should read ~1.00x), dynamic INT8 and INT4 at seq 128,
batch 1 and 8, 2 threads, spinning off. Cosine: each variant's sentence embeddings against fp32's
on the 64 built-in sentences (no variant is calibrated on them), one session at a time.
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

from _common import without_machine_paths, write_results  # noqa: E402


def step(name: str, args: list[str], log: list[dict], cwd: Path) -> dict:
    """Run ``onnxopt ARGS`` in a child; record wall seconds, peak RSS and exit code."""
    cmd = [sys.executable, "-m", "onnxopt.cli", *args]
    t0 = time.perf_counter()
    with open(cwd / f"{name}.log", "w") as out:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(p.pid, 0)
    rec = {"step": name, "command": "onnxopt " + " ".join(args), "exit": os.waitstatus_to_exitcode(status),
           "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    log.append(rec)
    print(f"{name:14s} exit {rec['exit']}  {rec['seconds']:7.1f} s  peak {rec['peak_rss_mb']:6d} MB", flush=True)
    if rec["exit"] != 0:
        print((cwd / f"{name}.log").read_text()[-3000:], file=sys.stderr)
    return rec


def files_mb(onnx_path: Path) -> float:
    extra = Path(str(onnx_path) + ".data")
    return round((onnx_path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)) / 2**20, 1)


def cosines(paths: dict[str, Path]) -> dict[str, dict]:
    """Mean/min cosine of each model's embeddings against the first's; one session alive at a time."""
    import numpy as np

    from onnxopt.evaluate import cosine_rows
    from onnxopt.runtime import make_session
    from onnxopt.zoo import _minilm_real

    feeds = _minilm_real(64)
    outs = {}
    for name, p in paths.items():
        s = make_session(p, threads=2)
        outs[name] = np.concatenate([s.run(None, {k: v[i:i + 8] for k, v in feeds.items()})[0]
                                     for i in range(0, 64, 8)])
        del s
    ref = outs[next(iter(paths))]
    res = {}
    for name, o in outs.items():
        c = cosine_rows(ref, o)
        res[name] = {"cosine_mean": round(float(c.mean()), 4), "cosine_min": round(float(c.min()), 4)}
    return res


def _args_without_work(argv: list[str]) -> list[str]:
    """The command line as committed: --work names a folder on one machine."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--work":
            skip = True
        elif not x.startswith("--work="):
            out.append(x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="big-encoder")
    ap.add_argument("--external-data", action="store_true", help="force external data at every step")
    ap.add_argument("--duration", type=float, default=6.0, help="bench seconds per variant and configuration")
    ap.add_argument("--out-name", default="scale")
    ap.add_argument("--work", help="keep the files in this folder (default: a temp folder, removed)")
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="onnxopt-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    ext = ["--external-data"] if a.external_data else []
    log: list[dict] = []
    m = a.model
    try:
        step("export", ["export", m, "-o", "fp32/model.onnx", *ext], log, work)
        # the table judges the variants (cosine below), not the per-channel gate: random weights give
        # the big encoder a few outlier channels that INT4's blocks move by more than their range
        loose = ["--max-channel-error", "100", "--min-cosine", "0.5"]
        step("quantize-int8", ["quantize", "fp32/model.onnx", "-o", "int8/model.onnx", *loose, *ext], log, work)
        step("quantize-int4", ["quantize", "fp32/model.onnx", "--mode", "int4", "-o", "int4/model.onnx", *loose,
                               *ext], log, work)
        step("prune", ["prune", "fp32/model.onnx", "-o", "pruned/model.onnx", "--amount", "0.5", "--data",
                       "sentences", *loose, *ext], log, work)
        (work / "copy").mkdir(exist_ok=True)
        for f in (work / "fp32").iterdir():
            if f.name.startswith("model.onnx"):
                shutil.copy(f, work / "copy" / f.name)
        models = {"fp32": "fp32/model.onnx", "fp32 (copy of itself)": "copy/model.onnx",
                  "dynamic INT8 (default)": "int8/model.onnx", "INT4 rtn b32": "int4/model.onnx"}
        models = {k: v for k, v in models.items() if (work / v).exists()}
        step("bench", ["bench", *models.values(), "--batch", "1,8", "--seq-len", "128", "--threads", "2",
                       "--duration", str(a.duration), "--no-memory", "--json"], log, work)
        bench_log = (work / "bench.log").read_text()
        bench = json.loads(bench_log[bench_log.index("{"):]) if log[-1]["exit"] == 0 else None
        step("pack", ["pack", "fp32/model.onnx", "-o", "bundle.tar.gz", *ext], log, work)
        step("verify-bundle", ["verify-bundle", "bundle.tar.gz"], log, work)
        cos = cosines({k: work / v for k, v in models.items() if "copy" not in k})
        rows = []
        for name, rel in models.items():
            row = {"variant": name, "mb": files_mb(work / rel), **cos.get(name, cos.get("fp32", {}))}
            for r in (bench or {}).get("rows", []):
                if r.get("path") == rel:
                    row[f"b{r['batch']}_speedup"] = r["speedup"]
                    row[f"b{r['batch']}_p50_ms"] = r["p50_ms"]
            rows.append(row)
        bundle_mb = round((work / "bundle.tar.gz").stat().st_size / 2**20, 1) if (work / "bundle.tar.gz").exists() else None
        result = {"model": m, "external_data_forced": a.external_data, "steps": log, "variants": rows,
                  "bundle_mb": bundle_mb, "machine": bench.get("machine") if bench else None,
                  "made_by": "python benchmarks/scale.py " + " ".join(x for x in _args_without_work(sys.argv[1:]))}
        result = without_machine_paths(result, str(work))
        write_results(a.out_name, result, markdown(result))

    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict) -> str:
    fp32_mb = next((v["mb"] for v in r["variants"] if v["variant"] == "fp32"), None)
    lines = [f"# Scale: {r['model']} end to end", "", f"Made by `{r['made_by']}` (one run).", "",
             "| step | exit | wall s | peak RSS MB | peak vs fp32 weights | command |", "|---|---|---|---|---|---|"]
    for s in r["steps"]:
        ratio = f"{s['peak_rss_mb'] / fp32_mb:.2f}x" if fp32_mb else "-"
        lines.append(f"| {s['step']} | {s['exit']} | {s['seconds']} | {s['peak_rss_mb']} | {ratio} | `{s['command']}` |")
    lines += ["", "| variant | MB | size vs fp32 | b1 vs fp32 | b8 vs fp32 | mean cos | min cos |",
              "|---|---|---|---|---|---|---|"]
    for v in r["variants"]:
        def x(k):
            return f"{v[k]:.2f}x" if v.get(k) is not None else "-"
        lines.append(f"| {v['variant']} | {v['mb']} | {v['mb'] / fp32_mb:.3f} | {x('b1_speedup')} | "
                     f"{x('b8_speedup')} | {v.get('cosine_mean', '-')} | {v.get('cosine_min', '-')} |")
    lines += ["", f"Bundle (fp32, model.onnx + model.onnx.data, tar.gz): {r['bundle_mb']} MB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
