"""Which torch exporter gives the faster ONNX graph, per built-in model (the `auto` default).

Exports each model with both exporters (each verified against PyTorch), then times the two files
side by side, interleaved, on ONNX Runtime CPU at batch 1 and 8, with all cores.

    python benchmarks/exporters.py [--duration 3] [--models ...]

Writes benchmarks/results/exporters.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
    ap.add_argument("--out", default=str(HERE / "results" / "exporters"))
    args = ap.parse_args()
    command = "python benchmarks/exporters.py " + " ".join(sys.argv[1:])
    settings = BenchSettings(batches=(1, 8), duration=args.duration, seq=128, memory=False)
    rows, sections, reports = [], [], {}
    with tempfile.TemporaryDirectory() as td:
        for name in args.models.split(","):
            paths = []
            for exp in ("torchscript", "dynamo"):
                p = Path(td) / exp / f"{name}.onnx"
                onnxopt.export(name, p, exporter=exp)
                paths.append(p)
            rep = onnxopt.bench(paths, settings=settings, names=[f"{name} torchscript", f"{name} dynamo"])
            reports[name] = rep
            sections.append(bench_markdown(rep, name))
            for r in rep["rows"]:
                if r["model"].endswith("dynamo"):
                    rows.append(f"| {name} | {r['batch']} | {r['speedup']:.2f}x | "
                                f"{'dynamo' if r['speedup'] > 1.02 else 'torchscript' if r['speedup'] < 0.98 else 'tie'} |")
            print(f"{name}: done", file=sys.stderr)
    head = ["# Exporter choice: dynamo vs TorchScript, side by side", "", f"Command: `{command.strip()}`", "",
            "dynamo speed vs torchscript = torchscript p50 / dynamo p50 (>1: dynamo's graph is faster).", "",
            "| model | batch | dynamo speed vs torchscript | faster |", "|---|---:|---:|---|"] + rows
    write_text(args.out + ".md", "\n".join(head) + "\n\n" + "\n".join(sections))
    write_json(args.out + ".json", {"command": command.strip(), "reports": without_temp_paths(reports, td)})
    print("\n".join(head))


if __name__ == "__main__":
    main()
