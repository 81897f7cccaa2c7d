"""Ensembles fused into one ONNX graph on digits: parallel ensembles, a cascade, model soups.

Run from the repository root:  .venv/bin/python benchmarks/ensemble.py [--duration 5]
Writes benchmarks/results/ensemble.{md,json}. Accuracy is on the whole digits test split (450
images; one image is 0.22 points). Every latency ratio comes from ONE interleaved timing run
(onnxopt.bench's interleaving, spinning off), 2 intra-op threads.

Two sets of three digits CNNs, seeds 0, 1, 2 of the recipe in models/train_digits.py:
* "full": trained on the whole train split -- digits_cnn.pt (the built-in model) and the
  committed digits_cnn_seed1.pt, digits_cnn_seed2.pt. Validation data for fitting (a seeded
  quarter of the train split) was seen in training, so fitted weights and thresholds are
  in-sample for these.
* "holdout": trained here with --holdout (without that quarter), so fitting sees unseen data.
Cascades: the small model is the big one with 50% of its channels pruned on the ONNX graph (least-
squares reconstruction), the threshold chosen on validation data to keep the big model's
validation accuracy. Soups: three copies of the holdout seed-0 model fine-tuned 5 epochs with
seeds 11-13 (the from-scratch seeds are souped too, to show why a soup needs a common start).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

import onnxopt.zoo as zoo  # noqa: E402
from onnxopt.bench import BenchSettings, bench  # noqa: E402
from onnxopt.data.digits import load_digits_split  # noqa: E402
from onnxopt.ensemble import (digits_validation_indices, ensemble, fused_vs_separate,  # noqa: E402
                              per_sample_latency)
from onnxopt.evaluate import evaluate  # noqa: E402
from onnxopt.export import export_spec  # noqa: E402
from onnxopt.feeds import Dataset, load_dataset  # noqa: E402
from onnxopt.prune import prune  # noqa: E402
from onnxopt.quantize import quantize  # noqa: E402

from _common import write_results, without_temp_paths  # noqa: E402

FT_EPOCHS, FT_LR, FT_SEEDS = 5, 1e-3, (11, 12, 13)
COMBOS = [("mean", None), ("softmax-mean", None), ("vote", None), ("softmax-mean", "fit"), ("weighted", "fit")]
THREADS = 2


def _export(state_or_file, out: Path) -> Path:
    def build():
        import torch
        from onnxopt.zoo.digits_cnn import DigitsCNN

        net = DigitsCNN()
        state = state_or_file if isinstance(state_or_file, dict) else torch.load(
            zoo.find_weights(state_or_file), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        return net.eval()

    base = zoo.get("digits-cnn")
    weights = state_or_file if isinstance(state_or_file, str) else f"trained by benchmarks/ensemble.py ({out.stem})"
    export_spec(dataclasses.replace(base, build=build, extra={**base.extra, "weights": weights}), out)
    return out


def _acc(path: Path) -> float:
    proto = onnx.load(path)
    return round(evaluate(proto, load_dataset("digits", proto))["accuracy"], 6)


def _fit_part() -> Dataset:
    x, y, _, _ = load_digits_split()
    keep = np.setdiff1d(np.arange(len(x)), digits_validation_indices(len(x)))
    return Dataset(f"digits train split minus validation ({len(keep)})", {"input": x[keep]}, y[keep])


def parallel_rows(work: Path, members: list[Path], label: str) -> list[dict]:
    rows = []
    for combine, weights in COMBOS:
        out = work / f"{label}.{combine}.{weights or 'uniform'}.onnx"
        side = ensemble(members, out, combine=combine, weights=weights, data="digits")
        e = side["ensemble"]
        rows.append({"members": label, "combine": combine, "weights_source": e["weights_source"],
                     "weights": e["weights"], "accuracy": e["accuracy"]["ensemble"],
                     "best_member": e["accuracy"]["best_member"], "member_accuracy": e["accuracy"]["members"],
                     "gain_points": e["accuracy"]["gain_points"], "log_loss": e["accuracy"]["log_loss"],
                     "validation": (e.get("fit") or {}).get("validation"), "path": str(out),
                     "max_abs_err_vs_separate": max(c["max_abs_err"] for c in side["verification"]["cases"])})
    return rows


def cascade_row(small: Path, big: Path, out: Path, label: str) -> dict:
    side = ensemble([small, big], out, method="cascade", data="digits", latency_seconds=0)
    e = side["ensemble"]
    return {"cascade": label, "threshold": e["threshold"], "choice": e["choice"], "routing": e["routing"],
            "branches_verified": side["verification"]["branches"], "path": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--render-only", action="store_true", help="re-write ensemble.md from ensemble.json")
    args = ap.parse_args()
    if args.render_only:
        out = ROOT / "benchmarks" / "results"
        (out / "ensemble.md").write_text(render(json.loads((out / "ensemble.json").read_text())))
        return
    from train_digits import train

    settings = BenchSettings(batches=(1,), threads=(THREADS,), providers=("cpu",), duration=args.duration,
                             memory=False)
    test = load_dataset("digits")
    results: dict = {"command": ("python benchmarks/ensemble.py " + " ".join(sys.argv[1:])).strip()}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("== members", file=sys.stderr, flush=True)
        full = [_export(f, work / f"full{i}.onnx")
                for i, f in enumerate(("digits_cnn.pt", "digits_cnn_seed1.pt", "digits_cnn_seed2.pt"))]
        states = [train(s, holdout=True, verbose=False)[0] for s in (0, 1, 2)]
        hold = [_export(st, work / f"holdout{i}.onnx") for i, st in enumerate(states)]
        results["members"] = {"full": [_acc(p) for p in full], "holdout": [_acc(p) for p in hold]}

        print("== parallel ensembles", file=sys.stderr, flush=True)
        results["parallel"] = parallel_rows(work, full, "full") + parallel_rows(work, hold, "holdout")
        fused = work / "full.weighted.fit.onnx"  # the fitted weighted mean: the headline ensemble
        speed = []
        for batch in (1, 64):  # one interleaved run per batch size: separate vs fused vs fused-parallel
            speed.append(fused_vs_separate(fused, full, batch=batch, threads=THREADS, seconds=args.duration,
                                           data=test))
        results["fused_vs_separate"] = speed
        q = quantize(fused, work / "full.weighted.int8.onnx", data="digits")
        results["quantized_ensemble"] = {"mode": q["quantize"]["chosen"], "accuracy": _acc(work / "full.weighted.int8.onnx"),
                                         "fp32_accuracy": _acc(fused)}
        results["bench"] = bench([full[0], fused, work / "full.weighted.int8.onnx"], settings=settings,
                                 data="digits", names=["single digits-cnn (seed 0)", "fused ensemble of 3 (fp32)",
                                                       "fused ensemble of 3, static INT8"])

        print("== cascades", file=sys.stderr, flush=True)
        prune(full[0], work / "full0.pruned.onnx", data="digits", amount=0.5)
        prune(hold[0], work / "holdout0.pruned.onnx", data=_fit_part(), amount=0.5)
        casc = [cascade_row(work / "full0.pruned.onnx", full[0], work / "cascade.full.onnx", "full"),
                cascade_row(work / "holdout0.pruned.onnx", hold[0], work / "cascade.holdout.onnx", "holdout")]
        # Composition with quantization: the fused cascade quantized afterwards (ORT's static QDQ
        # leaves the If's branch in float), and the cascade of two INT8 members.
        quantize(work / "cascade.full.onnx", work / "cascade.full.q.onnx", data="digits")
        quantize(work / "full0.pruned.onnx", work / "full0.pruned.int8.onnx", data="digits")
        quantize(full[0], work / "full0.int8.onnx", data="digits")
        casc.append(cascade_row(work / "full0.pruned.int8.onnx", work / "full0.int8.onnx",
                                work / "cascade.full.int8members.onnx", "full, INT8 members"))
        results["cascade"] = casc
        results["cascade_quantized_after_fusion_accuracy"] = _acc(work / "cascade.full.q.onnx")
        lat = {}
        for label, small, big in (("full", work / "full0.pruned.onnx", full[0]),
                                  ("holdout", work / "holdout0.pruned.onnx", hold[0])):
            models = {f"cascade ({label})": work / f"cascade.{label}.onnx", f"small ({label})": small,
                      f"big ({label})": big}
            if label == "full":
                models.update({"cascade (full), quantized after fusion": work / "cascade.full.q.onnx",
                               "cascade of INT8 members (full)": work / "cascade.full.int8members.onnx",
                               "big INT8 (full)": work / "full0.int8.onnx"})
            lat[label] = per_sample_latency(models, test, seconds=args.duration, threads=THREADS)
        results["cascade_latency"] = lat

        print("== soups", file=sys.stderr, flush=True)
        ft = [_export(train(s, state=states[0], epochs=FT_EPOCHS, lr=FT_LR, holdout=True, verbose=False)[0],
                      work / f"finetuned{k}.onnx") for k, s in enumerate(FT_SEEDS)]
        soups = []
        for label, members in (("fine-tuned from holdout seed 0", ft), ("from scratch (full seeds 0-2)", full)):
            for how in ("uniform", "greedy"):
                side = ensemble(members, work / f"soup.{how}.onnx", method="soup", soup=how, data="digits")
                e = side["ensemble"]
                soups.append({"members": label, "soup": how, "accuracy": e["accuracy"]["soup"],
                              "member_accuracy": e["accuracy"]["members"], "best_member": e["accuracy"]["best_member"],
                              "ingredients": e["ingredients"], "greedy": e.get("greedy")})
        ens_ft = ensemble(ft, work / "finetuned.ensemble.onnx", data="digits")["ensemble"]["accuracy"]["ensemble"]
        results["soup"] = {"rows": soups, "fine_tuned_mean_ensemble_accuracy": ens_ft,
                           "fine_tune": {"epochs": FT_EPOCHS, "lr": FT_LR, "seeds": list(FT_SEEDS),
                                         "start": "holdout seed 0", "data": "train split minus validation"}}
        results["seconds"] = round(time.perf_counter() - t_start, 1)
        results = without_temp_paths(results, tmp)
    write_results("ensemble", results, render(results))


def _pct(v) -> str:
    return f"{100 * v:.2f}%"


def summary(r: dict) -> list[str]:
    par = {(p["members"], p["combine"], p["weights_source"]): p for p in r["parallel"]}
    wf, wh = par[("full", "weighted", "fit")], par[("holdout", "weighted", "fit")]
    mf, mh = par[("full", "mean", "uniform")], par[("holdout", "mean", "uniform")]
    sp = {s["batch"]: s["rows"] for s in r["fused_vs_separate"]}
    cf, ch = (next(c for c in r["cascade"] if c["cascade"] == k) for k in ("full", "holdout"))
    lf, lh = r["cascade_latency"]["full"], r["cascade_latency"]["holdout"]
    soups = {(s["members"].split()[0], s["soup"]): s for s in r["soup"]["rows"]}
    ft_u, ft_g, sc_u = soups[("fine-tuned", "uniform")], soups[("fine-tuned", "greedy")], soups[("from", "uniform")]

    def ll(p):
        return f"test log-loss {p['log_loss']['ensemble']:.4f} vs {min(p['log_loss']['members']):.4f}"

    return ["## Summary", "",
            f"* **Fused weighted ensemble** (mean of logits, weights fitted): full members {_pct(wf['accuracy'])} vs "
            f"best single {_pct(wf['best_member'])} ({wf['gain_points']:+.2f} points = one image; the fit is "
            f"in-sample for these), {ll(wf)}; holdout members (fit on unseen validation data) {_pct(wh['accuracy'])} "
            f"vs {_pct(wh['best_member'])} ({wh['gain_points']:+.2f}), {ll(wh)}. The uniform mean: "
            f"{_pct(mf['accuracy'])} (full, {mf['gain_points']:+.2f}) and {_pct(mh['accuracy'])} (holdout, "
            f"{mh['gain_points']:+.2f}). With 3-4 errors per model on 450 images, accuracy differences are one or two "
            "images; the log-loss gain is the steadier signal.",
            f"* **One fused session vs three sessions one after another**: {sp[1][1]['speedup_vs_separate']:.2f}x at "
            f"batch 1, {sp[64][1]['speedup_vs_separate']:.2f}x at batch 64 (p50, one interleaved run each). Fusion "
            "saves per-call overhead, so it pays at small batches; at batch 64 the work is the same. ORT's parallel "
            f"executor ({sp[1][2]['speedup_vs_separate']:.2f}x / {sp[64][2]['speedup_vs_separate']:.2f}x) loses on "
            "this 2-core machine, where the intra-op threads already use both cores.",
            f"* **Cascade** (50%-pruned small model, then the big one): full {_pct(cf['routing']['accuracy']['cascade'])}"
            f" vs big {_pct(cf['routing']['accuracy']['big'])}, {_pct(cf['routing']['small'])} answered by the small "
            f"model, mean latency per sample {lf['cascade (full)']['mean_ms'] / lf['big (full)']['mean_ms']:.2f}x the "
            f"big model's; holdout {_pct(ch['routing']['accuracy']['cascade'])} vs "
            f"{_pct(ch['routing']['accuracy']['big'])}, {_pct(ch['routing']['small'])} small, "
            f"{lh['cascade (holdout)']['mean_ms'] / lh['big (holdout)']['mean_ms']:.2f}x latency.",
            f"* **Soups**: fine-tuned copies: uniform {_pct(ft_u['accuracy'])}, greedy {_pct(ft_g['accuracy'])} "
            f"({len(ft_g['ingredients'])} of 3) vs members {', '.join(_pct(a) for a in ft_u['member_accuracy'])}, at "
            f"the cost of one model. Models trained from different random starts do not soup: uniform "
            f"{_pct(sc_u['accuracy'])}; greedy falls back to the best single model.", ""]


def render(r: dict) -> str:
    machine = r["bench"]["machine"]
    L = ["# onnxopt ensemble benchmark", "", f"Command: `{r['command']}` ({r['seconds']} s)", "",
         __doc__.split("\n\n", 2)[2].strip(), "", f"Machine: {json.dumps(machine)}", ""] + summary(r) + [
         "## Members (test accuracy)", "",
         f"* full (seeds 0, 1, 2): {', '.join(_pct(a) for a in r['members']['full'])}",
         f"* holdout (seeds 0, 1, 2): {', '.join(_pct(a) for a in r['members']['holdout'])}", "",
         "## Parallel ensembles: one graph, three members", "",
         "Test accuracy and test log-loss (mean over 450 images) of the fused graph; the verification max abs error "
         "is the fused output against the same combination of the three separate models' outputs.", "",
         "| members | combine | weights | accuracy | best single | gain (points) | log-loss (best single) | "
         "fused vs separate max abs err |", "|---|---|---|---|---|---|---|---|"]
    for p in r["parallel"]:
        w = "uniform" if p["weights_source"] == "uniform" else "fit: " + ", ".join(f"{v:.3f}" for v in p["weights"])
        ll = p["log_loss"]["ensemble"]
        L.append(f"| {p['members']} | {p['combine']} | {w} | {_pct(p['accuracy'])} | {_pct(p['best_member'])} | "
                 f"{p['gain_points']:+.2f} | {'-' if ll is None else f'{ll:.4f}'} "
                 f"({min(p['log_loss']['members']):.4f}) | {p['max_abs_err_vs_separate']:.2g} |")
    L += ["", "Fitted weights minimise validation log-loss over the simplex; validation = "
          "`digits (validation: 337 of the train split, seed 0)` (in-sample for the full members).", "",
          "### Fused graph vs three separate sessions (the fitted weighted mean of the full members)", "",
          "One interleaved run per batch size. The separate sessions run on pre-built feeds and skip the "
          "combining step, which the fused graph includes, so the comparison favours them.", "",
          "| batch | variant | p50 ms | mean ms | speed-up vs separate (p50) |", "|---|---|---|---|---|"]
    for s in r["fused_vs_separate"]:
        for row in s["rows"]:
            L.append(f"| {s['batch']} | {row['variant']} | {row['p50_ms']:.4f} | {row['mean_ms']:.4f} | "
                     f"{row['speedup_vs_separate']:.2f}x |")
    qe = r["quantized_ensemble"]
    L += ["", f"Quantizing the fused ensemble ({qe['mode']} INT8, calibrated on the train split): test accuracy "
          f"{_pct(qe['fp32_accuracy'])} -> {_pct(qe['accuracy'])}.", "",
          "### `onnxopt bench` on the fused graph (one interleaved run, batch 1)", "",
          "| variant | p50 ms | speed-up vs single | accuracy |", "|---|---|---|---|"]
    for row in r["bench"]["rows"]:
        L.append(f"| {row['model']} | {row['p50_ms']:.4f} | {row['speedup']:.2f}x | {_pct(row['accuracy'])} |")
    L += ["", "## Cascade: pruned small model, then the big one (ONNX If)", "",
          "Routing and accuracy per sample (batch 1) on the test split; the threshold was chosen on the validation "
          "data to keep the big model's validation accuracy.", "",
          "| cascade | threshold | routed small / big | accuracy cascade | small | big | drop vs big (points) |",
          "|---|---|---|---|---|---|---|"]
    for c in r["cascade"]:
        a = c["routing"]["accuracy"]
        L.append(f"| {c['cascade']} | {c['threshold']:.4f} | {_pct(c['routing']['small'])} / "
                 f"{_pct(c['routing']['big'])} | {_pct(a['cascade'])} | {_pct(a['small'])} | {_pct(a['big'])} | "
                 f"{a['drop_points_vs_big']:+.2f} |")
    L += ["", f"The fused full cascade quantized afterwards (static QDQ): test accuracy "
          f"{_pct(r['cascade_quantized_after_fusion_accuracy'])}; ORT's quantizer does not descend into the If "
          "branch, so only the small model and the routing become INT8 -- quantize the members first for an all-INT8 "
          "cascade (row 'INT8 members').", ""]
    for label, lat in r["cascade_latency"].items():
        L += [f"### Mean latency per sample, {label} (one interleaved run over {lat['samples']} test images, "
              "batch 1)", "", "| model | mean ms | p50 ms | mean latency vs big |", "|---|---|---|---|"]
        big = lat[f"big ({label})"]["mean_ms"]
        for name, st in lat.items():
            if isinstance(st, dict) and "mean_ms" in st:
                L.append(f"| {name} | {st['mean_ms']:.4f} | {st['p50_ms']:.4f} | {st['mean_ms'] / big:.3f}x |")
        L.append("")
    L += ["## Model soups (one model: the averaged weights)", "",
          "| members | soup | ingredients | soup accuracy | members | best single |", "|---|---|---|---|---|---|"]
    for s in r["soup"]["rows"]:
        L.append(f"| {s['members']} | {s['soup']} | {len(s['ingredients'])} | {_pct(s['accuracy'])} | "
                 f"{', '.join(_pct(a) for a in s['member_accuracy'])} | {_pct(s['best_member'])} |")
    ft = r["soup"]["fine_tune"]
    L += ["", f"Fine-tuning: {ft['epochs']} epochs, lr {ft['lr']}, seeds {ft['seeds']}, from {ft['start']} on the "
          f"{ft['data']}. For comparison, the (logit) mean ensemble of the three fine-tuned copies (three times the "
          f"compute): {_pct(r['soup']['fine_tuned_mean_ensemble_accuracy'])}.", ""]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
