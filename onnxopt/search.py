"""The accuracy-gated auto search, and the evaluation of variants every recipe shares.

A *variant* is a list of steps (:class:`onnxopt.runner.Step`) run by the one runner
(:func:`onnxopt.runner.run_steps`) from the reference, or from another artifact (``base``). Every
variant is then judged against the reference in two stages: cheap checks first (the quality gates
of :class:`onnxopt.gates.Gates` on :func:`onnxopt.gates.gate_data`, and size), then the survivors
are timed side by side in one interleaved :func:`onnxopt.bench.bench` run (speed-up, p90). The
chosen variant is the fastest one that holds every gate; the report also marks the Pareto front
(latency vs quality vs size).

:func:`search_space` reads the passes: the pruning amounts and INT8 formats it tries are the
``search`` values of :class:`onnxopt.passes.PruneChannels` ``amount`` and
:class:`onnxopt.passes.QuantizeStatic` ``format``; any other registered pass with a field that
declares ``search`` values is offered on its own, one candidate per combination.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import onnx
import onnx_ir as ir

from ._version import __version__
from .artifact import lineage, load_model, model_size, read_sidecar, save_model, write_json, write_text
from .bench import BenchSettings, bench
from .errors import BadInput, GateFailed
from .executor import Executor, map_tasks, parse_executor
from .evaluate import predict_all
from .gates import Gates, gate_data, measure
from .jobs import calibration_data, eval_data
from .options import fields_of
from .progress import progress
from .runner import Step, calibration_feeds, needs_calibration, registry, run_steps

__all__ = ["search", "search_space", "evaluate_variants", "pareto_front", "torch_candidates", "write_reports",
           "raise_if_none"]

# The search calibrates on 64 samples: enough for INT8 ranges and the least-squares re-fit
# (resnet18: ~60 s per pruning ratio); a recipe's steps say their own calibration_samples.
SEARCH_CALIBRATION = 64
INT8 = (Step("quant-preprocess"), Step("quantize-static", {"calibration_samples": SEARCH_CALIBRATION}))
# Passes the built-in candidates compose; any other pass with search values is offered alone.
_COMPOSED = {"simplify", "quant-preprocess", "quantize-static", "quantize-dynamic", "quantize-int4", "fp16",
             "prune-masks", "prune-channels"}


def pareto_front(rows: list[dict]) -> list[str]:
    """Names of the rows no other row beats on every axis: lower p50, higher quality, smaller
    size (quality = accuracy when known, else agreement)."""
    def axes(r):
        return (r["p50_ms"], -(r.get("accuracy", r.get("agreement", 0.0)) or 0.0), r["bytes"])

    front = []
    for r in rows:
        a = axes(r)
        dominated = any(all(x <= y for x, y in zip(axes(o), a)) and any(x < y for x, y in zip(axes(o), a))
                        for o in rows if o is not r)
        if not dominated:
            front.append(r["name"])
    return front



# ---- the search space --------------------------------------------------------------------------

def _search_values(cls, name: str) -> tuple:
    return fields_of(cls)[name].metadata.get("search") or (fields_of(cls)[name].default,)


def _offered(passes: dict, has_calibration: bool) -> list[dict]:
    """Candidates for registered passes the built-in list does not compose: one per combination
    of the ``search`` values their fields declare."""
    cands = []
    for name, cls in passes.items():
        if name in _COMPOSED or (needs_calibration(cls) and not has_calibration):
            continue
        axes = {k: f.metadata["search"] for k, f in fields_of(cls).items() if f.metadata.get("search")}
        if not axes:
            continue
        for combo in itertools.product(*axes.values()):
            settings = dict(zip(axes, combo))
            label = ", ".join(f"{k}={v}" for k, v in settings.items())
            cands.append({"name": f"{name} {label}", "steps": [Step(name, settings)]})
    return cands


def _cnn_candidates(passes: dict) -> list[dict]:
    int8 = list(INT8)
    cands = [{"name": "INT8", "steps": int8}]
    # Light pruning first: it is what most often holds a tight gate. A prune step is shared
    # (through the step cache) by the INT8 and the fp32 variant built on it; the fp32 ones come
    # last, they are rarely the fastest. Channel counts rounded to multiples of 8: ORT's CPU
    # convolutions run odd widths far slower (digits-cnn pruned 10% to 29/58 channels ran at
    # 0.43x of dense).
    prunes = [Step("prune-channels", {"amount": a, "calibration_samples": SEARCH_CALIBRATION, "round_to": 8})
              for a in _search_values(passes["prune-channels"], "amount")] if "prune-channels" in passes else []
    for p in prunes:
        cands.append({"name": f"pruned {p.settings['amount']:.0%} + INT8", "steps": [p] + int8})
    for fmt in _search_values(passes["quantize-static"], "format")[1:]:
        cands.append({"name": f"INT8 {fmt}", "steps": [int8[0], Step("quantize-static", {
            **int8[1].settings, "format": fmt})]})
    for p in prunes:
        cands.append({"name": f"pruned {p.settings['amount']:.0%}", "steps": [p]})
    return cands


def search_space(model: onnx.ModelProto, *, has_calibration: bool, target: str = "cpu") -> list[dict]:
    """Candidate step lists for ``model``, cheapest first. Only passes from the registry; a
    candidate whose passes are missing there is dropped."""
    from .passes._common import FUSE_UP_TO_BYTES, looks_like_transformer
    from .passes._ort import weight_bytes

    passes = registry()
    m = ir.serde.deserialize_model(model)
    is_tf, _ = looks_like_transformer(m)
    cands: list[dict] = []
    if target == "cuda":
        cands.append({"name": "fp16", "steps": [Step("fp16")]})
    elif is_tf:
        # weight-only 4-bit: for size (measured slower than INT8 on MiniLM at seq 128;
        # benchmarks/results/int4.md), judged by the same gates
        int4 = [{"name": "INT4 weights", "steps": [Step("quantize-int4")]},
                {"name": "INT4 weights + embedding", "steps": [Step("quantize-int4", {"int4_embedding": True})]}]
        if weight_bytes(m) >= FUSE_UP_TO_BYTES:  # no fusions: ORT's optimizer runs out of memory
            cands += [{"name": "dynamic INT8", "steps": [Step("quantize-dynamic")]}] + int4
        else:
            fuse = Step("simplify", {"transformer": "bert", "gelu_approximation": True, "skip_layer_norm": False})
            cands += [{"name": "fused", "steps": [Step("simplify", {"transformer": "bert"})]},
                      {"name": "fused + dynamic INT8", "steps": [fuse, Step("quantize-dynamic")]}] + int4
    else:
        cands.append({"name": "simplified", "steps": [Step("simplify")]})
        if has_calibration and "quantize-static" in passes:
            cands += _cnn_candidates(passes)
    cands += _offered(passes, has_calibration)
    return [c for c in cands if all(Step.of(s).name in passes for s in c["steps"])]


# ---- building and judging variants -------------------------------------------------------------

def _name_file(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace(" + ", "+").replace(" ", "-"))



@dataclasses.dataclass
class _Context:
    """What every variant of one evaluation shares: the reference, its outputs on the gate
    samples, the calibration feeds, the cache, the gates."""

    reference: Path
    ref_proto: onnx.ModelProto
    eval_ds: object
    ds: object
    ref_out: object
    classification: bool | None
    calib_feeds: list | None
    calib_name: str | None
    gates: Gates
    out: Path
    cache_dir: Path | None


def _context(reference: Path, data, gates: Gates, out: Path, preprocess: str, cache: bool) -> _Context:
    ref_proto = load_model(reference)
    prev = read_sidecar(reference)
    task = (prev or {}).get("task")
    eval_ds = eval_data(data, ref_proto, prev, preprocess)
    gates.check_data(eval_ds)
    calib, calib_name = calibration_data(data, ref_proto, prev, eval_ds)
    ds = gate_data(eval_ds)
    ref_out = predict_all(ref_proto, ds, where="reference") if ds is not None else None
    cache_dir = out / ".cache" if cache else None
    if cache_dir:
        cache_dir.mkdir(parents=True, exist_ok=True)
    return _Context(reference, ref_proto, eval_ds, ds, ref_out, None if task is None else task == "classification",
                    calibration_feeds(calib), calib_name, gates, out, cache_dir)


def _build_variant(ctx: _Context, cand: dict, rec: dict) -> dict:
    """Build one candidate and judge its quality; ``rec`` gets status, steps, gates, path."""
    try:
        start, pre_steps = ctx.ref_proto, []
        if "base" in cand:  # a variant that starts from another artifact (e.g. pruned + fine-tuned)
            base_path, pre_steps = cand["base"]()
            start = load_model(base_path)
        proto, steps = run_steps(start, cand["steps"], calibration=ctx.calib_feeds, cache=ctx.cache_dir,
                                 where=cand.get("where", "steps"))
        steps = pre_steps + steps
    except BadInput as e:
        if cand.get("strict"):
            raise
        rec.update(status="failed", reason=e.one_line())
        return rec
    rec["steps"] = steps
    q = measure(ctx.ref_out, proto, ctx.ds, cand["name"], ctx.classification)
    rec.update(q)
    rec["gates"] = ctx.gates.check_quality(q)
    rec["status"] = "ok" if all(g["passed"] for g in rec["gates"]) else "rejected"
    path = ctx.out / "variants" / f"{_name_file(cand['name'])}.onnx"
    meta = lineage(ctx.reference, {"step": "recipe", "variant": cand["name"], "passes": steps, "onnxopt": __version__})
    meta["quality"] = {k: v for k, v in q.items() if k != "bytes"}
    save_model(proto, path, meta)
    rec["path"] = str(path)
    return rec


def _build_one(ctx: _Context, cand: dict) -> dict:
    """One candidate built and judged: what a Ray task runs (and the local loop, through it)."""
    rec: dict = {"name": cand["name"], "steps": [], "gates": []}
    return _build_variant(ctx, cand, rec)


def _build_all(ctx: _Context, candidates: list[dict], settings: BenchSettings, budget_s: float | None,
               executor: Executor = Executor()) -> list[dict]:
    t_start = time.perf_counter()
    # The budget covers the whole search: keep room for the final side-by-side timing.
    n_configs = len(settings.batches) * max(1, len(settings.threads)) * len(settings.providers)
    build_budget = None if budget_s is None else budget_s - n_configs * (settings.duration + 3)
    spent = {"status": "skipped", "reason": f"time budget of {budget_s or 0:g} s spent (or would be)"}
    bar = progress(total=len(candidates), desc="candidates", unit="variant")
    if executor.kind != "local":  # Ray tasks; what is still running when the budget ends is cancelled
        done = map_tasks(executor, _build_one, candidates, shared=ctx, on_done=lambda i, r: bar.update(1),
                         deadline=None if build_budget is None else t_start + build_budget,
                         skipped=lambda c: {"name": c["name"], "steps": [], "gates": [], **spent})
        bar.close()
        return [dict(rec, ran_in=where) if where else rec for rec, where in done]
    variants = []
    step_seconds: dict[str, float] = {}  # the slowest run of each pass so far, to predict the next
    for cand in candidates:
        if build_budget is not None and time.perf_counter() - t_start + _estimate(cand, step_seconds) > build_budget:
            rec = {"name": cand["name"], "steps": [], "gates": [], **spent}
        else:
            rec = _build_one(ctx, cand)
            for st in rec["steps"]:
                if not st.get("cached") and "seconds" in st:
                    step_seconds[st["step"]] = max(step_seconds.get(st["step"], 0.0), st["seconds"])
        variants.append(rec)
        bar.update(1)
    bar.close()
    return variants


def _time_survivors(ctx: _Context, variants: list[dict], settings: BenchSettings) -> tuple[dict | None, dict | None]:
    """Time the reference and every variant that passed the quality gates side by side; add
    latency, speed-up and the speed gates to them. Returns (bench report, the reference's row)."""
    survivors = [v for v in variants if v["status"] == "ok"]
    if not survivors:
        return None, None
    # the data, labelled or not: the timing runs on its first samples (random inputs cannot make a
    # sample rate or a recurrent state), and accuracy is added when it has labels
    report = bench([ctx.reference] + [v["path"] for v in survivors], settings=settings, data=ctx.eval_ds,
                   names=["reference"] + [v["name"] for v in survivors])
    first = (report["rows"][0]["provider"], report["rows"][0]["threads"], report["rows"][0]["batch"])
    rows = {r["model"]: r for r in report["rows"] if (r["provider"], r["threads"], r["batch"]) == first}
    for v in survivors:
        row = rows[v["name"]]
        v.update(p50_ms=row["p50_ms"], p90_ms=row["p90_ms"], speedup=row["speedup"])
        v["gates"] += ctx.gates.check_speed(row)
        if not all(g["passed"] for g in v["gates"]):
            v["status"] = "rejected"
    return report, rows.get("reference")


def _reference_row(ctx: _Context, ref_row: dict | None) -> dict:
    row = {"name": "reference", "status": "reference", "bytes": model_size(ctx.ref_proto),
           "path": str(ctx.reference), "steps": []}
    if ref_row:
        row.update(p50_ms=ref_row["p50_ms"], p90_ms=ref_row["p90_ms"], speedup=1.0)
    if ctx.ds is not None:
        row.update(measure(ctx.ref_out, ctx.ref_proto, ctx.ds, "reference", ctx.classification, produced=False,
                           out=ctx.ref_out))
    return row


def evaluate_variants(reference: Path, candidates: list[dict], *, data=None, gates: Gates | None = None,
                      settings: BenchSettings | None = None, out: Path, budget_s: float | None = None,
                      preprocess: str = "imagenet", cache: bool = True, executor: str | Executor | None = None) -> dict:
    """Build every candidate from ``reference``, check quality gates, time the survivors side by
    side, choose the fastest that holds every gate. Writes variants, report.json/md/html to ``out``.
    ``executor``: where the candidates are built and checked (:mod:`onnxopt.executor`); the timing
    always runs here, serially."""
    executor = parse_executor(executor)
    gates = gates or Gates()
    if gates.active():  # a gated search holds its variants to what every variant job holds
        gates = gates.for_variant()
    settings = settings or BenchSettings(batches=(1,), duration=2.0, memory=False)
    out = Path(out)
    ctx = _context(Path(reference), data, gates, out, preprocess, cache)
    t_start = time.perf_counter()
    variants = _build_all(ctx, candidates, settings, budget_s, executor)
    build_s = time.perf_counter() - t_start
    report_bench, ref_row = _time_survivors(ctx, variants, settings)
    reference_row = _reference_row(ctx, ref_row)
    timed = [r for r in [reference_row] + variants if "p50_ms" in r]
    front = pareto_front(timed) if timed else []
    for r in [reference_row] + variants:
        r["pareto"] = r["name"] in front
    passing = [v for v in variants if v["status"] == "ok"]
    chosen = min(passing, key=lambda v: v["p50_ms"]) if passing else None
    report = {
        "kind": "search", "out": str(out), "reference": str(reference), "data": getattr(ctx.eval_ds, "name", None),
        "calibration_data": ctx.calib_name, "gates": gates.active(), "settings": dataclasses.asdict(settings),
        "reference_row": reference_row, "variants": variants, "pareto_front": front,
        "chosen": chosen["name"] if chosen else None,
        "why": (f"fastest of {len(passing)} variant(s) that hold every gate ({chosen['speedup']:.2f}x vs the "
                f"reference at batch {settings.batches[0]})" if chosen else
                "no variant holds every gate"),
        "build_seconds": round(build_s, 2), "bench": report_bench, "onnxopt": __version__,
        "executor": executor.describe(),
    }
    if chosen:
        best = out / "best.onnx"
        save_model(load_model(chosen["path"]), best, read_sidecar(chosen["path"]))
        report["best"] = str(best)
    write_reports(report, out)
    return report


def _estimate(cand: dict, step_seconds: dict[str, float]) -> float:
    """Seconds a candidate will likely take: each pass as long as its slowest run so far; a pass
    not run yet as long as the slowest pass seen (0 before anything ran). Cached steps are not
    known here, so this errs long -- the budget is a bound, not a target."""
    worst = max(step_seconds.values(), default=0.0)
    return sum(step_seconds.get(Step.of(s).name, worst) for s in cand["steps"])



def write_reports(report: dict, out: Path) -> None:
    from .report import search_html, search_markdown

    write_json(out / "report.json", report)
    write_text(out / "report.md", search_markdown(report))
    write_text(out / "report.html", search_html(report))


def torch_candidates(source: str, out: Path, *, amounts=(0.5, 0.625, 0.75), epochs: int = 20, round_to: int = 8
                     ) -> list[dict]:
    """Variants that need the torch source: channel pruning with Torch-Pruning plus fine-tuning
    on the built-in dataset's train split (never the test split the gates read), alone and + INT8.
    Channel counts are rounded to multiples of ``round_to``: ORT's CPU convolutions run odd widths
    far slower (measured on digits-cnn: 60% pruned to 13/26 channels ran 2.6x slower than 50%).
    Built lazily, so the time budget applies to them too."""
    from .prune_torch import prune_finetune

    def base(amount):
        def build():
            path = out / "bases" / f"torch-pruned-{int(amount * 100)}-ft{epochs}-r{round_to}.onnx"
            side = read_sidecar(path) if path.exists() else None
            if side is None:
                side = prune_finetune(source, path, amount=amount, epochs=epochs, data="digits", round_to=round_to)
            return path, [s for s in side["steps"] if s["step"] != "export"]
        return build

    int8 = list(INT8)
    out_c = []
    for a in amounts:
        b = base(a)
        out_c.append({"name": f"torch-pruned {a:.0%} + {epochs} epochs", "base": b, "steps": []})
        out_c.append({"name": f"torch-pruned {a:.0%} + {epochs} epochs + INT8", "base": b, "steps": int8})
    return out_c



def search(model: str | Path, out: str | Path, *, data=None, gates: Gates | None = None, target: str = "cpu",
           settings: BenchSettings | None = None, budget_s: float | None = None, preprocess: str = "imagenet",
           source: str | None = None, executor: str | Executor | None = None) -> dict:
    """The auto search on an ONNX file: every candidate of :func:`search_space`, gated, timed,
    the fastest passing one chosen. ``source``: the torch model the file was exported from; with
    the built-in digits data, pruned-and-fine-tuned candidates join the search. Raises GateFailed
    (exit 3) when none passes; the report is written either way."""
    ref_proto = load_model(model)
    prev = read_sidecar(model)
    has_cal = data is not None or (prev or {}).get("dataset") is not None
    cands = search_space(ref_proto, has_calibration=has_cal, target=target)
    if source is not None and (data or (prev or {}).get("dataset")) == "digits" and target == "cpu":
        cands += torch_candidates(source, Path(out))
    report = evaluate_variants(Path(model), cands, data=data, gates=gates, settings=settings, out=Path(out),
                               budget_s=budget_s, preprocess=preprocess, executor=executor)
    raise_if_none(report, out)
    return report


def raise_if_none(report: dict, out) -> None:
    """GateFailed (exit 3, with the report) when no variant holds every gate."""
    if report["chosen"] is None:
        fails = []
        for v in report["variants"]:
            bad = [f"{g['gate']} {g['value']} vs {g['limit']}" for g in v.get("gates", []) if not g["passed"]]
            fails.append(f"{v['name']}: {', '.join(bad) or v.get('reason', v['status'])}")
        raise GateFailed(str(Path(out) / "report.json"), "no variant holds every gate (" + "; ".join(fails[:4])
                         + ("; ..." if len(fails) > 4 else "") + ")",
                         "loosen the gates or widen the search", report=report)
