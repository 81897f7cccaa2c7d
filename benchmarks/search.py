"""The accuracy-gated auto search (`onnxopt optimize MODEL --max-drop ...`) on the built-in models.

Run from the repository root:  .venv/bin/python benchmarks/search.py [--only digits,resnet18,minilm]
Writes benchmarks/results/search.{md,json}. Each search times its surviving variants against the
fp32 reference in ONE interleaved run, 2 threads.

* digits-cnn, `--max-drop 0.5` (accuracy points on the 450-image test split), batch 450: the
  torch source is known, so pruned + fine-tuned candidates (train split only) join the ONNX ones.
* resnet18 (seeded random weights, so no labels): the ONNX file with 64 random-normal images as
  data and an agreement gate (`--min-cosine 0.99`: mean output cosine with fp32 -- top-1
  agreement is meaningless for a random-weight network on noise, whose logits are near-tied),
  batch 1, with a 120 s budget on the whole search.
* minilm: the built-in sentence encoder with its built-in `sentences` data (64 sentences, no
  labels) and `--min-cosine 0.98`, timed at seq 128, batch 1.
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

from onnxopt.bench import BenchSettings  # noqa: E402
from onnxopt.optimize import optimize  # noqa: E402

from _common import write_results, without_temp_paths  # noqa: E402


def run(name: str, work: Path) -> dict:
    t0 = time.perf_counter()
    if name == "digits":
        rep = optimize("digits-cnn", work / "digits", max_drop=0.5,
                       settings=BenchSettings(batches=(450,), threads=(2,), providers=("cpu",), duration=5,
                                              memory=False))
        cmd = "onnxopt optimize digits-cnn --max-drop 0.5 --batch 450 --threads 2 --duration 5 --no-memory"
    elif name == "minilm":
        rep = optimize("minilm", work / "minilm", min_cosine=0.98,
                       settings=BenchSettings(batches=(1,), threads=(2,), providers=("cpu",), duration=5,
                                              memory=False))
        cmd = "onnxopt optimize minilm --min-cosine 0.98 --batch 1 --threads 2 --duration 5 --no-memory"
    else:
        import onnxopt

        src = work / "resnet18.onnx"
        onnxopt.export("resnet18", src)
        images = np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32)
        np.savez(work / "images.npz", input=images)
        t0 = time.perf_counter()  # the search itself, not the export
        rep = optimize(str(src), work / "r18", data=str(work / "images.npz"), min_cosine=0.99, budget_s=120,
                       settings=BenchSettings(batches=(1,), threads=(2,), providers=("cpu",), duration=5,
                                              memory=False))
        cmd = ("onnxopt optimize resnet18.onnx --data images.npz --min-cosine 0.99 --budget 120 --batch 1 "
               "--threads 2 --duration 5 --no-memory")
    rep["search_seconds"] = round(time.perf_counter() - t0, 1)
    rep["command"] = cmd
    return rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="digits,resnet18,minilm")
    args = ap.parse_args()
    from onnxopt.report import search_markdown

    out = ROOT / "benchmarks" / "results"
    # --only re-runs some models and keeps the others' last results (each keeps its own command).
    previous = json.loads((out / "search.json").read_text()) if (out / "search.json").exists() else {}
    results = {k: v for k, v in previous.items() if k != "command"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            print(f"== {name}", file=sys.stderr, flush=True)
            rep = without_temp_paths(run(name, Path(tmp)), tmp)
            rep.pop("bench", None)
            results[name] = rep
    results["command"] = "python benchmarks/search.py"
    lines = ["# onnxopt auto search", "", "Command: `python benchmarks/search.py [--only digits,resnet18,minilm]`", "",
             __doc__.split("\n\n", 2)[2], ""]
    for name in ("digits", "resnet18", "minilm"):
        if name in results:
            rep = results[name]
            md = search_markdown(rep).replace("# onnxopt search report", f"## {name}")
            lines += [md, f"Equivalent CLI: `{rep['command']}`; whole search {rep['search_seconds']} s.", ""]
    write_results("search", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
