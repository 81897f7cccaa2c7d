"""Head replacement (transfer learning) vs training from scratch, on few labelled examples.

Run from the repository root:  .venv/bin/python benchmarks/head.py [--seeds 5] [--shots 5,20] [--duration 3]
Writes benchmarks/results/head.{md,json}.

* digits: the backbone is ``models/digits04_cnn.pt`` (DigitsCNN trained on digits 0-4 only, by
  ``models/train_digits04.py``). The new task is digits 5-9 with N labelled examples per class,
  drawn from the train split with seeds 0..S-1; the test set is every 5-9 image of the test split
  (224, never used for training or choosing). Per draw, side by side:
  - linear head on the classifier input (the habit: pooled 64 features), ONNX route;
  - linear / MLP head with the cut chosen by 5-fold cross-validated accuracy (``--cut auto``);
  - torch route: new head + the last 1 or all 3 conv blocks fine-tuned (``--finetune-last``);
  - the same CNN trained from scratch on the same examples (same early-stopping protocol: a fifth
    held out to find the epoch count, then refit on all; BatchNorm in train mode, lr 1e-3).
* minilm: the real all-MiniLM-L6-v2 encoder (ONNX), a head on ``sentence_embedding`` for the 8
  topics of onnxopt's built-in sentences: 5 labelled sentences per topic, the other 3 are the test.
* latency: the 0-4 backbone and two grafted 5-9 models in one interleaved ``bench`` run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the backbone factory is models.train_digits04:digits04_cnn

from onnxopt.bench import BenchSettings, bench  # noqa: E402
from onnxopt.export import export_spec  # noqa: E402
from onnxopt.head import (_class_map, _map_test, deterministic_torch, few_shot, fit_torch, folds_for,  # noqa: E402
                          head, labelled_data, select_classes)
from onnxopt.sources import resolve  # noqa: E402

from _common import write_results, without_temp_paths  # noqa: E402

CLASSES = (5, 6, 7, 8, 9)


def scratch(per_class: int, seed: int) -> float:
    """DigitsCNN(5 classes) from random init on the same examples; test accuracy on 5-9."""
    import torch

    from onnxopt.zoo.digits_cnn import DigitsCNN

    train = few_shot(select_classes(labelled_data("digits", "data"), CLASSES), per_class, seed)
    classes, _, y = _class_map(train.labels, None)
    test, _ = _map_test(labelled_data("digits", "test", split="test"), classes)
    folds = folds_for(y, 5, seed)
    with deterministic_torch():
        def fit(epochs, tr, va):
            torch.manual_seed(seed)
            net = DigitsCNN(num_classes=len(classes))
            hist = fit_torch(net, list(net.parameters()), train.inputs, y, tr, va, epochs=epochs, patience=20,
                             lr=1e-3, weight_decay=1e-4, batch=32, class_weights="balanced", classes=len(classes),
                             seed=seed, names=["input"], train_mode=True, desc="scratch")
            return net, hist

        _, hist = fit(200, np.flatnonzero(folds != 0), np.flatnonzero(folds == 0))
        net, _ = fit(max(1, hist["best_epoch"]), np.arange(len(y)), None)
        with torch.no_grad():
            pred = net(torch.from_numpy(test.inputs["input"])).argmax(1).numpy()
    return float((pred == test.labels).mean())


def digits(work: Path, seeds: int, shots: list[int]) -> dict:
    spec = resolve("models.train_digits04:digits04_cnn", input_shape="1x1x8x8")
    backbone = work / "digits04.onnx"
    export_spec(spec, backbone)
    cache = work / "cache"
    variants = {
        "linear head, classifier input (habit)": lambda n, s, out: head(
            backbone, out, cut="head", **_kw(n, s, cache)),
        "linear head, cut chosen by CV (default)": lambda n, s, out: head(backbone, out, **_kw(n, s, cache)),
        "MLP head, cut chosen by CV": lambda n, s, out: head(backbone, out, kind="mlp", **_kw(n, s, cache)),
        "fine-tune last 1 block + new head (torch)": lambda n, s, out: head(
            spec, out, finetune_last=1, **_kw(n, s, None)),
        "fine-tune all 3 conv blocks + new head (torch)": lambda n, s, out: head(
            spec, out, finetune_last=3, **_kw(n, s, None)),
    }
    rows = []
    keep = {}
    for n in shots:
        for name, fn in variants.items():
            accs, cuts, secs = [], [], []
            for seed in range(seeds):
                out = work / f"d59.{n}.{seed}.{len(rows)}.onnx"
                t0 = time.perf_counter()
                side = fn(n, seed, out)
                secs.append(time.perf_counter() - t0)
                accs.append(side["head"]["test_acc"])
                cuts.append(side["head"]["cut"])
                assert side["verification"]["passed"]
                if seed == 0 and n == max(shots):
                    keep[name] = out
            rows.append(_row(name, n, accs, cuts, secs))
            print(f"  {n}/class {name}: {np.mean(accs):.4f}", file=sys.stderr, flush=True)
        accs, secs = [], []
        for seed in range(seeds):
            t0 = time.perf_counter()
            accs.append(scratch(n, seed))
            secs.append(time.perf_counter() - t0)
        rows.append(_row("same CNN from scratch on the same examples", n, accs, None, secs))
        print(f"  {n}/class scratch: {np.mean(accs):.4f}", file=sys.stderr, flush=True)
    return {"rows": rows, "models": {k: str(v) for k, v in keep.items()}, "backbone": str(backbone)}


def _kw(n: int, seed: int, cache) -> dict:
    kw = dict(data="digits", test_data="digits", classes="5-9", per_class=n, seed=seed)
    if cache is not None:
        kw["cache_dir"] = cache
    return kw


def _row(name, n, accs, cuts, secs) -> dict:
    return {"variant": name, "per_class": n, "test_acc_mean": float(np.mean(accs)),
            "test_acc_std": float(np.std(accs)), "test_acc": [round(a, 4) for a in accs],
            "cuts": cuts, "seconds_mean": round(float(np.mean(secs)), 2)}


def minilm(work: Path) -> dict:
    import onnxopt
    from onnxopt.data.text import SENTENCES, TOPICS, tokenize
    from onnxopt.feeds import Dataset

    enc = work / "minilm.onnx"
    onnxopt.export("minilm", enc)
    tr = [i for i in range(len(SENTENCES)) if i % 8 < 5]
    te = [i for i in range(len(SENTENCES)) if i % 8 >= 5]

    def ds(idx):
        return Dataset("built-in sentences", tokenize([SENTENCES[i] for i in idx]), np.array([i // 8 for i in idx]))

    rows = []
    for kind in ("linear", "mlp"):
        side = head(enc, work / f"minilm.{kind}.onnx", data=ds(tr), test_data=ds(te), cut="sentence_embedding",
                    kind=kind, class_names=list(TOPICS), cache_dir=work / "cache")
        h = side["head"]
        rows.append({"head": kind, "train": h["samples"], "test": h["test_samples"], "val_acc_cv": h["val_acc"],
                     "test_acc": h["test_acc"], "graft_max_abs_err": side["verification"]["max_abs_err"],
                     "seconds": h["seconds"]})
    # A reference point without training: nearest topic centroid of the embeddings (cosine).
    from onnxopt.head import extract_features
    import onnx

    proto = onnx.load(enc)
    f_tr = extract_features(proto, ds(tr), ["sentence_embedding"], cache_dir=work / "cache")["sentence_embedding"]
    f_te = extract_features(proto, ds(te), ["sentence_embedding"], cache_dir=work / "cache")["sentence_embedding"]
    y_tr, y_te = np.array([i // 8 for i in tr]), np.array([i // 8 for i in te])
    cent = np.stack([f_tr[y_tr == c].mean(0) for c in range(len(TOPICS))])
    rows.append({"head": "nearest centroid (no training)", "train": len(tr), "test": len(te), "val_acc_cv": None,
                 "test_acc": float(((f_te @ cent.T).argmax(1) == y_te).mean()), "graft_max_abs_err": None,
                 "seconds": None})
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--shots", default="5,20")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--only", default="digits,minilm")
    args = ap.parse_args()
    os.environ.setdefault("ONNXOPT_NO_PROGRESS", "1")
    shots = [int(s) for s in args.shots.split(",")]
    results: dict = {"command": ("python benchmarks/head.py " + " ".join(sys.argv[1:])).strip()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "digits" in args.only:
            print("== digits", file=sys.stderr, flush=True)
            results["digits"] = digits(work, args.seeds, shots)
            m = results["digits"]["models"]
            paths = [results["digits"]["backbone"], m["linear head, cut chosen by CV (default)"],
                     m["fine-tune last 1 block + new head (torch)"]]
            results["digits"]["bench"] = bench(
                paths, settings=BenchSettings(batches=(1, 224), threads=(2,), providers=("cpu",),
                                              duration=args.duration, memory=False),
                names=["digits 0-4 backbone (5 classes)", "5-9: linear head grafted at the CV-chosen cut",
                       "5-9: last block fine-tuned + new head"])
        if "minilm" in args.only:
            print("== minilm", file=sys.stderr, flush=True)
            results["minilm"] = minilm(work)
        results = without_temp_paths(results, tmp)
    write(results)


def write(results: dict) -> None:
    lines = ["# onnxopt head benchmark", "", f"Command: `{results['command']}`", "",
             __doc__.split("\n\n", 2)[2].strip(), ""]
    if "digits" in results:
        d = results["digits"]
        lines += ["## digits: backbone trained on 0-4, new task 5-9 (test: 224 images of 5-9)", "",
                  "| examples per class | variant | test accuracy (mean ± std over draws) | per draw | cut chosen | "
                  "seconds |", "|---|---|---|---|---|---|"]
        for r in d["rows"]:
            cuts = "-" if not r["cuts"] or r["cuts"][0].startswith("input of") else (
                r["cuts"][0] if len(set(r["cuts"])) == 1 else ", ".join(r["cuts"]))
            lines.append(f"| {r['per_class']} | {r['variant']} | {r['test_acc_mean']:.4f} ± {r['test_acc_std']:.4f} | "
                         f"{', '.join(f'{a:.3f}' for a in r['test_acc'])} | {cuts} | {r['seconds_mean']} |")
        for n in sorted({r["per_class"] for r in d["rows"]}):
            rs = {r["variant"]: r for r in d["rows"] if r["per_class"] == n}
            best = max(rs.values(), key=lambda r: r["test_acc_mean"])
            habit = rs["linear head, classifier input (habit)"]["test_acc_mean"]
            cv = rs["linear head, cut chosen by CV (default)"]["test_acc_mean"]
            sc = rs["same CNN from scratch on the same examples"]
            ft1 = rs["fine-tune last 1 block + new head (torch)"]["test_acc_mean"]
            ft3 = rs["fine-tune all 3 conv blocks + new head (torch)"]["test_acc_mean"]
            lines += ["", f"**{n} per class**: best on average is *{best['variant']}* ({best['test_acc_mean']:.4f}). "
                      f"Choosing the cut by cross-validation instead of taking the pooled classifier input: "
                      f"{habit:.4f} -> {cv:.4f} ({100 * (cv - habit):+.1f} points). Fine-tuning the last block / "
                      f"all conv blocks: {ft1:.4f} / {ft3:.4f}. From scratch: "
                      f"{sc['test_acc_mean']:.4f} ± {sc['test_acc_std']:.4f}; the frozen-backbone heads "
                      + ("beat it." if cv > sc["test_acc_mean"] + sc["test_acc_std"] else
                         "do not beat it on this tiny 8x8 task (a CNN this small learns 5 new digits from a few "
                         "examples about as fast as features of 0-4 transfer to them).")]
        lines += ["", "Cut names: `view` = the pooled classifier input (64 features); `relu_2` = the last conv "
                  "block's output before pooling (64x4x4); `max_pool2d` = the input of the last conv block "
                  "(64x4x4); `relu_1` = the second block's output (64x8x8).", ""]
        lines += ["### latency, one interleaved run (2 threads)", "",
                  "| model | batch | p50 ms | speed-up vs backbone |", "|---|---|---|---|"]
        for row in d["bench"]["rows"]:
            lines.append(f"| {row['model']} | {row['batch']} | {row['p50_ms']:.4f} | {row['speedup']:.2f}x |")
        lines.append("")
    if "minilm" in results:
        lines += ["## minilm: topic head on sentence embeddings (8 topics, 5 labelled sentences each, 24 test)", "",
                  "| head | val acc (5-fold CV) | test accuracy | graft max abs error | seconds |", "|---|---|---|---|---|"]
        for r in results["minilm"]["rows"]:
            v = "-" if r["val_acc_cv"] is None else f"{r['val_acc_cv']:.3f}"
            g = "-" if r["graft_max_abs_err"] is None else f"{r['graft_max_abs_err']:.1e}"
            lines.append(f"| {r['head']} | {v} | {r['test_acc']:.4f} | {g} | {r['seconds'] or '-'} |")
        lines.append("")
    write_results("head", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
