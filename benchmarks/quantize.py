"""onnxopt quantize defaults vs fp32 and vs ORT's plain quantize_static defaults, side by side.

Run from the repository root:  .venv/bin/python benchmarks/quantize.py [--duration 3] [--repeat 3] [--only resnet18,...]
Writes benchmarks/results/quantize.{md,json}. Every ratio comes from bench() calls that interleave
all variants of a model (batch 1 and 2 threads unless stated); --repeat N runs N such calls and
reports the median ratio with the range. resnet18/mobilenet_v2 have random (seeded)
weights, so they are calibrated on random-normal images (128 samples): ranges for a random-weight
network are as representative as any. digits-cnn is calibrated on its train split and evaluated
on its test split. MiniLM is timed at seq 128 on random token ids; cosine is measured on the
built-in sentences.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from onnxopt.bench import BenchSettings  # noqa: E402
from onnxopt.evaluate import predict  # noqa: E402
from onnxopt.feeds import Dataset  # noqa: E402
from onnxopt.quantize import quantize  # noqa: E402

from _common import write_results, ratio_range, repeated_bench, without_temp_paths

REPEAT = 1  # set by --repeat


NOTES = """Notes: batch 1 and 2 threads unless stated; each table is --repeat independent bench() runs,
each interleaving all the table's variants; p50 and speed-up are medians over the runs, "runs"
gives the range of the speed-up. Compare ratios within a table only: on this shared 2-core VM a
whole run can be slower, INT8 more than fp32 (resnet18 INT8 read 2.6x to 3.1x on the same files
within an hour). resnet18/mobilenet_v2 have seeded random weights and are
calibrated on 128 random-normal images (acceptable for random weights). "ORT quantize_static
defaults" is `quantize_static(model, out, reader)` with nothing else set (QDQ, int8 activations,
per-tensor weights, no pre-processing). "--format qoperator" is onnxopt's defaults with QOperator
ops instead of QDQ (CPU-only files; QDQ stays the default: portable to other execution providers
and needed by the accuracy fallback). MiniLM: onnxopt auto = onnxruntime.transformers fusions
(heads/hidden detected from the graph, FastGelu, residual Add + LayerNorm kept apart because
ORT's CPU SkipLayerNormalization kernel is slower) + dynamic per-channel INT8 of the TorchScript
export; the last MiniLM row is the same with SkipLayerNormalization fused (ablation), timed at
seq 128 on random ids; cosine_mean/cosine_min are over the 64 built-in sentences
vs the fp32 dynamo export (the table's cosine_min is on the random-id timing batch). digits-cnn is
calibrated on its train split; accuracy is on the test split.
"""


def ort_plain_static(src: Path, dst: Path, images: np.ndarray) -> None:
    """What a user gets from ORT's documented defaults: quantize_static(model, out, reader)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader())


def cnn(name: str, work: Path, settings: BenchSettings) -> dict:
    fp32 = work / f"{name}.onnx"
    onnxopt.export(name, fp32)
    images = np.random.default_rng(0).standard_normal((128, 3, 224, 224)).astype(np.float32)
    calib = Dataset("random-normal images", {"input": images})
    t0 = time.perf_counter()
    side = quantize(fp32, work / f"{name}.int8.onnx", data=calib)
    q_s = time.perf_counter() - t0
    ort_plain_static(fp32, work / f"{name}.ortdefault.onnx", images)
    quantize(fp32, work / f"{name}.qop.onnx", data=calib, format="qoperator")
    rep = repeated_bench([fp32, work / f"{name}.int8.onnx", work / f"{name}.ortdefault.onnx", work / f"{name}.qop.onnx"],
                settings=settings, repeat=REPEAT,
                names=[f"{name} fp32", f"{name} onnxopt quantize (defaults)", f"{name} ORT quantize_static defaults",
                       f"{name} onnxopt quantize --format qoperator"])
    return {"bench": rep, "quantize_seconds": round(q_s, 1), "chosen": side["quantize"]}


def digits(work: Path, settings: BenchSettings) -> dict:
    fp32 = work / "digits.onnx"
    onnxopt.export("digits-cnn", fp32)
    side = quantize(fp32, work / "digits.int8.onnx", data="digits")
    s = BenchSettings(**{**settings.__dict__, "batches": (1, 450)})
    rep = repeated_bench([fp32, work / "digits.int8.onnx"], settings=s, data="digits", repeat=REPEAT,
                names=["digits-cnn fp32", "digits-cnn onnxopt quantize (defaults)"])
    return {"bench": rep, "accuracy": side["verification"]["accuracy"], "chosen": side["quantize"]}


def minilm(work: Path, settings: BenchSettings) -> dict:
    from onnxopt.zoo import _minilm_real

    dyn, ts = work / "minilm.dynamo.onnx", work / "minilm.ts.onnx"
    onnxopt.export("minilm", dyn, exporter="dynamo")
    onnxopt.export("minilm", ts, exporter="torchscript")
    side = quantize(ts, work / "minilm.auto.onnx")
    # Ablation: the same fusions with ORT's SkipLayerNormalization kept (the optimizer's default
    # and onnxopt's default before it measured the CPU kernel), then the same dynamic INT8.
    onnxopt.simplify(ts, work / "minilm.sln.onnx", transformer="bert", gelu_approximation=True)
    quantize(work / "minilm.sln.onnx", work / "minilm.sln.int8.onnx", mode="dynamic", fuse_transformer=False)
    s = BenchSettings(**{**settings.__dict__, "batches": (1, 8), "seq": 128})
    rep = repeated_bench([dyn, ts, work / "minilm.auto.onnx", work / "minilm.sln.int8.onnx"], settings=s, repeat=REPEAT,
                names=["minilm fp32 (dynamo)", "minilm fp32 (torchscript)", "minilm onnxopt quantize auto",
                       "minilm same INT8 with SkipLayerNormalization fused"])
    ds = Dataset("built-in sentences", _minilm_real(64))
    ref = predict(dyn, ds)
    out = predict(work / "minilm.auto.onnx", ds)
    r, o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    cos = (r * o).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1))
    fusions = next(p["stats"]["fusions"] for p in side["steps"][-1]["passes"] if p["step"] == "simplify")
    return {"bench": rep, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "chosen": side["quantize"], "fusions": fusions}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--only", default="resnet18,mobilenet_v2,minilm,digits")
    ap.add_argument("--repeat", type=int, default=3, help="independent interleaved runs; medians reported")
    args = ap.parse_args()
    global REPEAT
    REPEAT = args.repeat
    settings = BenchSettings(batches=(1,), threads=(2,), providers=("cpu",), duration=args.duration, memory=False)
    results: dict = {"command": "python benchmarks/quantize.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.only.split(","):
            print(f"== {name}", file=sys.stderr, flush=True)
            results[name] = (cnn(name, work, settings) if name in ("resnet18", "mobilenet_v2")
                             else minilm(work, settings) if name == "minilm" else digits(work, settings))
            for row in results[name]["bench"]["rows"]:
                print(f"{row['model']:45s} b{row['batch']:<4d} p50 {row['p50_ms']:8.3f} ms  "
                      f"{row['speedup']:.2f}x  {ratio_range(row)}", file=sys.stderr, flush=True)
    lines = ["# onnxopt quantize benchmark", "", f"Command: `{results['command'].strip()}`", "", NOTES,
             f"Machine: {json.dumps(next(iter(v['bench']['machine'] for k, v in results.items() if k != 'command')))}",
             "", "| model | batch | p50 ms | speed-up vs first row | runs | notes |", "|---|---|---|---|---|---|"]
    for key, res in results.items():
        if key == "command":
            continue
        for row in res["bench"]["rows"]:
            note = ""
            if "accuracy" in row:
                note = f"accuracy {row['accuracy']:.4f}"
            elif "agreement" in row and "cosine_min" in row["agreement"]:
                note = f"cosine_min vs first {row['agreement']['cosine_min']:.4f}"
            lines.append(f"| {row['model']} | {row['batch']} | {row['p50_ms']:.3f} | {row['speedup']:.2f}x | "
                         f"{ratio_range(row)} | {note} |")
        extra = {k: v for k, v in res.items() if k not in ("bench",)}
        lines += ["", f"{key}: `{json.dumps(extra, sort_keys=True)}`", ""]
        lines += ["| model | batch | p50 ms | speed-up vs first row | runs | notes |", "|---|---|---|---|---|---|"] \
            if key != list(results)[-1] else []
    write_results("quantize", without_temp_paths(results, tmp), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
