"""Every onnxopt command on every file of the real-world corpus (tests/realworld), judged by each
package's own pipeline, with ORT's plain quantize_static / quantize_dynamic defaults beside it.

Run from the repository root:  .venv/bin/python benchmarks/realworld.py [--only key,...] [--duration 1.5]
                                                       [--commands simplify,quantize,...] [--no-time]
Writes benchmarks/results/realworld.{md,json}.

Per file and command: the exit code; for a refusal its one-line reason; whether the output had a
traceback; for a written model the package pipeline's verdict (same text / boxes / labels /
speech segments as the shipped file), the size ratio and the latency ratio against the original
(ORT CPU, 2 threads, spinning off, original and variant interleaved on the first recorded sample:
onnxopt.bench.speed_ratio). The original timed against a byte copy of itself is the first row of
every file (it must read ~1.00x). Each file's feeds are recorded once by running its package
(corpus.recorded) and given to every command as --data.
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path.insert(0, str(ROOT / "tests"))

from _common import RESULTS, first_sample, without_machine_paths, write_results  # noqa: E402
from realworld import corpus  # noqa: E402

ONNXOPT = [sys.executable, "-m", "onnxopt.cli"]

# name -> (onnxopt arguments after MODEL, writes a model at -o)
COMMANDS: dict[str, tuple[list[str], bool]] = {
    "simplify": (["simplify"], True),
    "quantize": (["quantize"], True),
    "quantize-static": (["quantize", "--mode", "static"], True),
    "quantize-dynamic": (["quantize", "--mode", "dynamic"], True),
    "prune-channel": (["prune", "--method", "channel", "--amount", "0.3"], True),
    "prune-magnitude": (["prune", "--method", "magnitude", "--amount", "0.5"], True),
    "optimize": (["optimize", "--min-cosine", "0.99", "--budget", "120", "--duration", "0.5",
                  "--no-memory", "--no-torch"], False),
    "bench": (["bench", "--duration", "0.5", "--no-memory"], False),
    "pack": (["pack"], False),
}
WITH_DATA = {"quantize", "quantize-static", "quantize-dynamic", "prune-channel", "prune-magnitude",
             "simplify", "optimize", "bench"}


def _cli(args: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(ONNXOPT + args, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = None, "", f"timed out after {timeout:.0f} s"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
    return {"rc": rc, "traceback": "Traceback (most recent call last)" in err + out,
            "error": error[:300] if rc not in (0,) else "", "wall_s": round(time.perf_counter() - t0, 1),
            "stderr_tail": "\n".join(lines[-12:]) if rc not in (0,) else ""}


REPEAT = 1  # set by --repeat: independent interleaved timings per row, the median reported


def _speed(original: Path, candidate: Path, feeds, seconds: float) -> dict:
    import statistics

    import onnx

    from onnxopt.bench import speed_ratio

    try:
        a, b = onnx.load(str(original)), onnx.load(str(candidate))
        runs = [speed_ratio(a, b, feeds, seconds=seconds, threads=2) for _ in range(REPEAT)]
    except Exception as e:  # the table says why a row has no ratio
        return {"speedup": None, "why": f"{type(e).__name__}: {e}"[:200]}
    ratios = [r["speedup"] for r in runs]
    out = dict(runs[0], speedup=statistics.median(ratios))
    if len(runs) > 1:
        out["speedup_runs"] = ratios
    return out


class _Reader:
    """ORT CalibrationDataReader over recorded samples, one feed dict at a time (what a user of
    plain onnxruntime.quantization writes by hand)."""

    def __init__(self, samples):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)


def _ort_plain(kind: str, src: Path, dst: Path, npz: Path) -> dict:
    """ORT's own defaults, called as its docs show (quant_pre_process first, as they advise)."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from onnxopt.feeds import load_dataset

    t0 = time.perf_counter()
    src, dst = src.resolve(), dst.resolve()
    try:
        # in the work folder: ORT's symbolic shape inference leaves temp files in the cwd
        with contextlib.chdir(dst.parent):
            pre = dst.with_suffix(".pre.onnx")
            try:
                quant_pre_process(str(src), str(pre))
            except Exception:
                shutil.copy(src, pre)
            if kind == "ort-dynamic":
                quantize_dynamic(str(pre), str(dst))
            else:
                ds = load_dataset(str(npz), preprocess="raw")
                samples = ds.samples if ds.per_sample else [
                    {k: v[i:i + 1] if v.ndim else v for k, v in ds.inputs.items()} for i in range(len(ds))]
                quantize_static(str(pre), str(dst), _Reader(samples[:32]))
        return {"rc": 0, "traceback": False, "error": "", "wall_s": round(time.perf_counter() - t0, 1)}
    except Exception as e:
        return {"rc": 1, "traceback": True, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                "wall_s": round(time.perf_counter() - t0, 1)}


def run_file(entry, commands, cache: Path, work: Path, duration: float, timing: bool) -> list[dict]:
    src = entry.path()
    npz = corpus.recorded(entry.key, cache)
    feeds = first_sample(npz)
    rows = []
    size0 = src.stat().st_size

    def judged(name, res, out):
        row = {"file": entry.key, "command": name, **res}
        if res["rc"] == 0 and out is not None:
            if not out.exists():
                row.update(rc=None, error="exit 0 but no model written")
            else:
                try:
                    v = entry.check(out)
                except Exception as e:
                    v = {"ok": False, "detail": f"pipeline failed: {type(e).__name__}: {e}"[:200], "metric": 0.0}
                row.update(pipeline_ok=v["ok"], pipeline=v["detail"], metric=v["metric"],
                           size_ratio=round(out.stat().st_size / size0, 3))
                if timing:
                    row.update(_speed(src, out, feeds, duration))
        rows.append(row)
        print(f"  {entry.key:20s} {name:17s} rc={row['rc']} "
              f"{'ok' if row.get('pipeline_ok') else ('BROKEN' if 'pipeline_ok' in row else '')} "
              f"{row.get('speedup') or ''} {row.get('error', '')[:120]}", flush=True)

    copy = work / f"{entry.key}.copy.onnx"
    shutil.copy(src, copy)
    judged("(copy of itself)", {"rc": 0, "traceback": False, "error": "", "wall_s": 0.0}, copy)
    inspect = _cli(["inspect", str(src), "--json"], 300)
    rows.append({"file": entry.key, "command": "inspect", **inspect})
    for name in commands:
        if name.startswith("ort-"):
            out = work / f"{entry.key}.{name}.onnx"
            judged(name, _ort_plain(name, src, out, npz), out)
            continue
        args, writes = COMMANDS[name]
        out = work / f"{entry.key}.{name}.onnx"
        extra = ["--data", str(npz)] if name in WITH_DATA else []
        if name == "optimize":
            res = _cli([args[0], str(src), "-o", str(work / f"{entry.key}.opt"), *args[1:], *extra], 900)
            best = work / f"{entry.key}.opt" / "best.onnx"
            judged(name, res, best if res["rc"] == 0 and best.exists() else None)
        elif name == "pack":
            bundle = work / f"{entry.key}.tar.gz"
            res = _cli(["pack", str(src), "-o", str(bundle), "--data", str(npz)], 300)
            if res["rc"] == 0:
                res = _cli(["verify-bundle", str(bundle)], 300)
            judged("pack+verify-bundle", res, None)
        else:
            res = _cli([args[0], str(src), *args[1:], *extra, *(["-o", str(out)] if writes else [])], 900)
            judged(name, res, out if writes else None)
    return rows


def _fmt(row) -> str:
    rc = "timeout" if row["rc"] is None and "timed out" in row.get("error", "") else row["rc"]
    pipe = "" if "pipeline_ok" not in row else ("same" if row["pipeline_ok"] else f"**changed** ({row['pipeline']})")
    sp = row.get("speedup")
    why = row.get("error", "").replace("|", "\\|")
    runs = row.get("speedup_runs") or []
    lat = f"{sp:.2f}x" if sp else ""
    if len(runs) > 1:
        lat += f" ({min(runs):.2f}-{max(runs):.2f}, {len(runs)} runs)"
    return (f"| {row['file']} | {row['command']} | {rc} | {'yes' if row.get('traceback') else ''} | {pipe} | "
            f"{row['size_ratio'] if 'size_ratio' in row else ''} | {lat} | {why} |")


def markdown(rows, made_by: list[str], env) -> str:
    lines = ["# Real-world corpus: every command on every file", "",
             "Made by: " + ", then ".join(f"`{c}`" for c in made_by), "",
             f"Machine: {env}. ORT CPU, 2 threads, spinning off; latency ratio = original p50 / "
             "variant p50, interleaved, on the file's first recorded sample (> 1: faster; where a range "
             "is given, the median of that many independent timings). "
             "`(copy of itself)` is the original timed against a byte copy (should read ~1.00x). "
             "`pipeline` is the package's own answer with the variant swapped in, against the "
             "shipped file's. ort-static / ort-dynamic are onnxruntime.quantization's "
             "quantize_static / quantize_dynamic with their defaults after quant_pre_process, "
             "calibrated on the same recorded samples.", "",
             "| file | command | exit | traceback | pipeline | size | latency | refusal / error |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_fmt(r) for r in rows if r["command"] != "inspect"]
    ours = [r for r in rows if r["command"] in ("quantize",)]
    tb = sum(bool(r.get("traceback")) for r in rows if not r["command"].startswith("ort-"))
    broken = [r for r in rows if r.get("rc") == 0 and r.get("pipeline_ok") is False and not r["command"].startswith("ort-")]
    fast = [r for r in ours if r.get("pipeline_ok") and (r.get("speedup") or 0) >= 1.3]
    slower = [r for r in ours if r.get("rc") == 0 and r.get("speedup") is not None and r["speedup"] < 0.97]
    fast_list = ", ".join("%s %.2fx" % (r["file"], r["speedup"]) for r in fast)
    controls = [r["speedup"] for r in rows if r["command"] == "(copy of itself)" and r.get("speedup")]
    repeated = [r["speedup"] for r in rows if r["command"] == "(copy of itself)" and r.get("speedup_runs")]
    best: dict = {}
    for r in rows:
        if (r.get("pipeline_ok") and not r["command"].startswith(("ort-", "(")) and (r.get("speedup") or 0) >= 1.3
                and r["speedup"] > best.get(r["file"], {}).get("speedup", 0)):
            best[r["file"]] = r
    best_list = ", ".join(f"{f} {r['command']} {r['speedup']:.2f}x (size {r['size_ratio']:.2f}x)"
                          for f, r in best.items())
    lines += ["", "## Headline", "",
              f"- onnxopt tracebacks: {tb}; onnxopt results written with exit 0 that change the "
              f"pipeline's answer: {len(broken)}" + (f" ({', '.join(r['file'] + ' ' + r['command'] for r in broken)})" if broken else ""),
              f"- default `quantize`: {sum(r.get('rc') == 0 for r in ours)} of {len(ours)} files written; "
              f">= 1.3x with the answer unchanged: {len(fast)} ({fast_list}); "
              f"slower than the original (< 0.97x): {len(slower)}",
              f"- any onnxopt command >= 1.3x with the answer unchanged: {len(best)} file(s) ({best_list})",
              f"- the original against a byte copy of itself: {min(controls, default=1):.2f}-"
              f"{max(controls, default=1):.2f}x (the noise of these timings: ratios inside it are not a result)"
              + (f"; {min(repeated):.2f}-{max(repeated):.2f}x as the median of repeated timings "
                 f"({', '.join(sorted({r['file'] for r in rows if r.get('speedup_runs')}))})" if repeated else ""),
              "- ORT plain defaults: "
              + "; ".join(f"{k}: {sum(r.get('rc') == 0 for r in rows if r['command'] == k)} written, "
                          f"{sum(r.get('pipeline_ok') is False for r in rows if r['command'] == k)} change the answer, "
                          f"{sum(bool(r.get('traceback')) for r in rows if r['command'] == k)} crash"
                          for k in ("ort-static", "ort-dynamic")), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated corpus keys")
    ap.add_argument("--commands", default=",".join([*COMMANDS, "ort-static", "ort-dynamic"]))
    ap.add_argument("--duration", type=float, default=1.5, help="seconds of interleaved timing per pair")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--repeat", type=int, default=1,
                    help="independent interleaved timings per row; the table gives the median and the range")
    ap.add_argument("--cache", default=str(ROOT / ".pytest_cache" / "d" / "realworld"))
    ap.add_argument("--no-write", action="store_true", help="print, do not write results/")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the (file, command) rows this run makes in the committed results")
    ap.add_argument("--rerender", action="store_true", help="re-write results/realworld.md from the .json")
    a = ap.parse_args(argv)
    if a.rerender:
        old = without_machine_paths(json.loads((RESULTS / "realworld.json").read_text()))
        old["env"] = old.get("env") or _env()
        write_results("realworld", old, markdown(old["rows"], old.get("made_by", []), old["env"]))
        return 0
    global REPEAT
    REPEAT = max(1, a.repeat)
    entries = [corpus.by_key(k) for k in a.only.split(",")] if a.only else corpus.ENTRIES
    commands = [c for c in a.commands.split(",") if c]
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for e in entries:
            if not e.available():
                print(f"skip {e.key}: {e.package} not installed")
                continue
            rows += run_file(e, commands, cache, Path(td), a.duration, not a.no_time)
    rows = without_machine_paths(rows, td)
    env = _env()
    made_by = [" ".join(["python", "benchmarks/realworld.py", *(argv if argv is not None else sys.argv[1:])])]
    if a.merge:
        old = json.loads((RESULTS / "realworld.json").read_text())
        new = {(r["file"], r["command"]): r for r in rows}
        merged = [new.pop((r["file"], r["command"]), r) for r in old["rows"]]
        rows, made_by = merged + list(new.values()), old.get("made_by", []) + made_by
    results = {"rows": rows, "made_by": made_by, "env": env}
    md = markdown(rows, made_by, env)
    if a.no_write:
        print(md)
    else:
        write_results("realworld", results, md)
    return 0


def _env() -> str:
    import platform

    import onnxruntime

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}"


if __name__ == "__main__":
    sys.exit(main())
