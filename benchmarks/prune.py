"""Pruning on ONNX graphs vs dense, side by side: accuracy, parameters, size, latency.

Run from the repository root:  .venv/bin/python benchmarks/prune.py [--duration 5] [--only digits,resnet18]
Writes benchmarks/results/prune.{md,json}. Every latency ratio comes from ONE bench() call
(variants interleaved), batch 1 and 2 threads unless stated.

* digits-cnn (real data): the ONNX file only, 50% of the channels, with and without least-squares
  reconstruction (calibrated on the train split); beside it the torch route -- Torch-Pruning with 0
  and 2 epochs of fine-tuning on the train split. Accuracy is on the whole test split (450).
  Masks (magnitude 50%/80%, 2:4) show what zeros buy: gzip size, not speed.
* resnet18 (seeded random weights, so no accuracy): 50% channels on the ONNX file, calibrated on 64
  random-normal images, then static INT8 on top; dense INT8 and magnitude masks beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from onnxopt.bench import BenchSettings, bench, file_sizes  # noqa: E402
from onnxopt.evaluate import evaluate  # noqa: E402
from onnxopt.feeds import Dataset, load_dataset  # noqa: E402
from onnxopt.prune import prune  # noqa: E402
from onnxopt.quantize import quantize  # noqa: E402

from _common import write_results, without_temp_paths  # noqa: E402


def _acc(path: Path) -> float:
    proto = onnx.load(path)
    return evaluate(proto, load_dataset("digits", proto))["accuracy"]


def _row(name: str, path: Path, side: dict, dense_params: int, dense_gz: int, **extra) -> dict:
    summ = side.get("prune") or {}
    st = next((s for s in side["steps"] if s["step"] == "prune-finetune"), None)
    params = summ.get("params_after") or (st and st["params_after"])
    sizes = file_sizes(path)
    return {"variant": name, "params": params, "params_ratio": round(params / dense_params, 4) if params else None,
            "gzip_ratio": round(sizes["size_gz_bytes"] / dense_gz, 4), **extra}


def digits(work: Path, settings: BenchSettings) -> dict:
    from onnxopt.passes.prune import count_params
    import onnx_ir as ir

    fp32 = work / "digits.onnx"
    onnxopt.export("digits-cnn", fp32)
    dense_params = count_params(ir.serde.deserialize_model(onnx.load(fp32)))
    dense_gz = file_sizes(fp32)["size_gz_bytes"]
    rows = [{"variant": "dense fp32", "params": dense_params, "params_ratio": 1.0, "gzip_ratio": 1.0,
             "accuracy": _acc(fp32)}]
    timings = {}
    for name, kw in [("ONNX channel 50% + reconstruction", {"data": "digits"}),
                     ("ONNX channel 50%, no reconstruction", {"data": "digits", "reconstruct": False}),
                     ("ONNX magnitude 50% (masks)", {"method": "magnitude", "amount": 0.5}),
                     ("ONNX magnitude 80% (masks)", {"method": "magnitude", "amount": 0.8}),
                     ("ONNX 2:4 (masks)", {"method": "nm"})]:
        out = work / f"digits.{len(rows)}.onnx"
        t0 = time.perf_counter()
        side = prune(fp32, out, **kw)
        timings[name] = round(time.perf_counter() - t0, 2)
        rows.append(_row(name, out, side, dense_params, dense_gz, accuracy=_acc(out), seconds=timings[name]))
    for epochs in (0, 2):
        name = f"torch-pruning 50% + {epochs} epoch(s) fine-tuning"
        out = work / f"digits.tp{epochs}.onnx"
        t0 = time.perf_counter()
        side = prune("digits-cnn", out, finetune_epochs=epochs, data="digits", amount=0.5)
        rows.append(_row(name, out, side, dense_params, dense_gz, accuracy=_acc(out),
                         seconds=round(time.perf_counter() - t0, 2)))
    s = BenchSettings(**{**settings.__dict__, "batches": (1, 450)})
    rep = bench([fp32, work / "digits.1.onnx", work / "digits.tp2.onnx"], settings=s, data="digits",
                names=["digits dense fp32", "digits ONNX channel 50% + reconstruction",
                       "digits torch-pruning 50% + 2 epochs"])
    return {"rows": rows, "bench": rep}


def resnet18(work: Path, settings: BenchSettings) -> dict:
    fp32 = work / "resnet18.onnx"
    onnxopt.export("resnet18", fp32)
    images = np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32)
    calib = Dataset("64 random-normal images", {"input": images})
    t0 = time.perf_counter()
    side = prune(fp32, work / "r18.p50.onnx", data=calib, amount=0.5, calibration_samples=64)
    prune_s = round(time.perf_counter() - t0, 1)
    quantize(work / "r18.p50.onnx", work / "r18.p50.int8.onnx", data=calib)
    quantize(fp32, work / "r18.int8.onnx", data=calib)
    prune(fp32, work / "r18.mag50.onnx", method="magnitude", amount=0.5)
    prune(fp32, work / "r18.mag80.onnx", method="magnitude", amount=0.8)
    paths = [fp32, work / "r18.p50.onnx", work / "r18.p50.int8.onnx", work / "r18.int8.onnx",
             work / "r18.mag50.onnx", work / "r18.mag80.onnx"]
    names = ["resnet18 dense fp32", "resnet18 ONNX channel 50%", "resnet18 ONNX channel 50% + INT8",
             "resnet18 dense INT8", "resnet18 magnitude 50% (masks)", "resnet18 magnitude 80% (masks)"]
    rep = bench(paths, settings=settings, names=names)
    return {"bench": rep, "prune_seconds": prune_s, "params_ratio": side["prune"]["params_ratio"],
            "groups": len(side["steps"][-1]["passes"][0]["stats"]["groups"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--only", default="digits,resnet18")
    args = ap.parse_args()
    settings = BenchSettings(batches=(1,), threads=(2,), providers=("cpu",), duration=args.duration, memory=False)
    results: dict = {"command": ("python benchmarks/prune.py " + " ".join(sys.argv[1:])).strip()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.only.split(","):
            print(f"== {name}", file=sys.stderr, flush=True)
            results[name] = digits(work, settings) if name == "digits" else resnet18(work, settings)
        results = without_temp_paths(results, tmp)
    lines = ["# onnxopt prune benchmark", "", f"Command: `{results['command']}`", "", __doc__.split("\n\n", 2)[2],
             "", f"Machine: {json.dumps(next(v['bench']['machine'] for k, v in results.items() if k != 'command'))}",
             ""]
    if "digits" in results:
        lines += ["## digits-cnn (test split, 450 images)", "",
                  "| variant | accuracy | params | params vs dense | gzip size vs dense | seconds |",
                  "|---|---|---|---|---|---|"]
        for r in results["digits"]["rows"]:
            lines.append(f"| {r['variant']} | {r['accuracy']:.4f} | {r['params']:,} | {r['params_ratio']:.3f}x | "
                         f"{r['gzip_ratio']:.2f}x | {r.get('seconds', '')} |")
        lines.append("")
    for key, res in results.items():
        if key == "command":
            continue
        lines += [f"## {key}: latency, one interleaved run", "",
                  "| variant | batch | p50 ms | speed-up vs dense | latency vs dense | gzip MB |", "|---|---|---|---|---|---|"]
        for row in res["bench"]["rows"]:
            lines.append(f"| {row['model']} | {row['batch']} | {row['p50_ms']:.3f} | {row['speedup']:.2f}x | "
                         f"{1 / row['speedup']:.3f}x | {row['size_gz_bytes'] / 1e6:.2f} |")
        if key == "resnet18":
            lines.append(f"\nresnet18: {res['groups']} coupled channel groups, params {res['params_ratio']:.3f}x, "
                         f"pruning took {res['prune_seconds']} s.")
        lines.append("")
    write_results("prune", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
