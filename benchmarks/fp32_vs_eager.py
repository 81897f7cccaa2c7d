"""ONNX fp32 (ONNX Runtime, CPU) vs PyTorch eager for the built-in models, in one run.

For each model: export with onnxopt's default exporter (verified), then time side by side,
interleaved: the ONNX file, a byte-identical copy of it (a control that must read ~1.00x: if it
does not, the method is biased), and the torch module in eager mode, at batch 1 and 8 and with
1 and 2 intra-op threads. Text inputs for MiniLM are 128 tokens.

    python benchmarks/fp32_vs_eager.py [--duration 3] [--models digits-cnn,resnet18,...]

Writes benchmarks/results/fp32_vs_eager.{md,json}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import onnxopt
from onnxopt.artifact import write_json, write_text
from onnxopt.bench import BenchSettings
from onnxopt.report import bench_markdown

from _common import without_temp_paths

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-cnn,resnet18,mobilenet_v2,minilm")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--out", default=str(HERE / "results" / "fp32_vs_eager"))
    args = ap.parse_args()
    settings = BenchSettings(batches=(1, 8), threads=(1, 2), duration=args.duration, warmup=5, min_rounds=10,
                             seq=128, memory=False)
    command = "python benchmarks/fp32_vs_eager.py " + " ".join(sys.argv[1:])
    sections, reports, summary = [], {}, []
    with tempfile.TemporaryDirectory() as td:
        for name in args.models.split(","):
            t0 = time.time()
            path = Path(td) / f"{name}.onnx"
            side = onnxopt.export(name, path)
            copy = Path(td) / "copy" / f"{name}.onnx"
            copy.parent.mkdir(exist_ok=True)
            shutil.copy(path, copy)
            rep = onnxopt.bench([path, copy], settings=settings, torch_ref=name,
                                names=[f"{name} ONNX fp32", f"{name} ONNX fp32 (copy, control)"])
            rep["export"] = {"exporter": side["steps"][0]["exporter"], "opset": side["opset"]}
            reports[name] = rep
            sections.append(bench_markdown(rep, f"{name} (exported with {side['steps'][0]['exporter']})"))
            for r in rep["rows"]:
                if r["kind"] == "torch":
                    onnx_p50 = next(x["p50_ms"] for x in rep["rows"] if x["model"] == f"{name} ONNX fp32"
                                    and x["batch"] == r["batch"] and x["threads"] == r["threads"])
                    copy_ratio = next(x["speedup"] for x in rep["rows"] if "control" in x["model"]
                                      and x["batch"] == r["batch"] and x["threads"] == r["threads"])
                    summary.append([name, r["batch"], r["threads"], onnx_p50, r["p50_ms"], r["p50_ms"] / onnx_p50,
                                    copy_ratio])
            print(f"{name}: done in {time.time() - t0:.0f}s", file=sys.stderr)
    head = ["# ONNX fp32 vs PyTorch eager, side by side", "",
            f"Command: `{command.strip()}`", "",
            "ONNX speed-up over eager = eager p50 / ONNX p50, measured interleaved in the same run. "
            "The control column times a byte-identical copy of the ONNX file against it (expect 1.00x).", "",
            "| model | batch | threads | ONNX p50 ms | eager p50 ms | ONNX speed-up over eager | copy control |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    head += [f"| {m} | {b} | {t} | {o:.3f} | {e:.3f} | {s:.2f}x | {c:.2f}x |" for m, b, t, o, e, s, c in summary]
    write_text(args.out + ".md", "\n".join(head) + "\n\n" + "\n".join(sections))
    write_json(args.out + ".json", {"command": command.strip(), "reports": without_temp_paths(reports, td)})
    print("\n".join(head))


if __name__ == "__main__":
    main()
