"""Declarative pipelines, gates and the accuracy-gated auto search.

Both the recipe runner (``onnxopt run recipe.yaml``) and the auto search (``onnxopt optimize MODEL
--max-drop 1``) build *variants* the same way: a list of steps, each a pass looked up by name in
:data:`onnxopt.passes.PASSES` with its settings (the pass's dataclass fields), run by one plain loop
(:func:`run_steps`) that records name, settings, seconds, nodes and bytes per step and injects
calibration data into passes that take it. A pass added to the registry later is usable from a
recipe, and offered to the search when :func:`search_space` lists it, with no other change.

Every variant is then checked against the reference in two stages: cheap checks first (accuracy
or agreement on the evaluation data, size), then the survivors are timed side by side in one
interleaved :func:`onnxopt.bench.bench` run (speed-up, p90). The chosen variant is the fastest one
that holds every gate; the report also marks the Pareto front (latency vs quality vs size).

Steps are cached by content hash (input model bytes + pass + settings + data), so re-running a
recipe reuses finished steps and gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from ._version import __version__
from .artifact import lineage, load_model, model_bytes, read_sidecar, save_model, write_json, write_text
from .bench import BenchSettings, bench
from .errors import BadInput, GateFailed
from .evaluate import agreement, predict
from .feeds import Dataset, array_digest
from .jobs import allowed_drop, calibration_data, eval_data, head, parse_max_drop
from .progress import progress

__all__ = ["Gates", "run_steps", "search_space", "search", "run_recipe", "load_recipe", "pareto_front"]

logger = logging.getLogger(__name__)

EVAL_SAMPLES = 512
CALIBRATION_SAMPLES = 64
PRUNE_CALIBRATION = 64  # samples for the least-squares re-fit in the search (resnet18: ~60 s per ratio)
_PLACEHOLDER = object()  # stands in for calibration data when a recipe's steps are validated


# ---- gates -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Gates:
    """What a variant must hold. ``max_drop``: accuracy points (``0.5``/``"1%"``) or relative
    (``"2%rel"``), needs labels; ``min_agreement``: top-1 agreement with the reference for
    classifiers, min cosine otherwise (the gate without labels); ``min_cosine``: mean cosine
    similarity of the outputs with the reference's (for classifiers whose top-1 is unstable, e.g.
    random-weight networks on noise, where near-tied logits flip); ``min_speedup`` vs the reference
    at the first batch size; ``max_size_mb`` on disk; ``max_p90_ms`` at the first batch size."""

    max_drop: float | str | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    min_speedup: float | None = None
    max_size_mb: float | None = None
    max_p90_ms: float | None = None

    def __post_init__(self):
        parse_max_drop(self.max_drop)
        for name in ("min_agreement", "min_cosine", "min_speedup", "max_size_mb", "max_p90_ms"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or v < 0 or not np.isfinite(v)):
                raise BadInput(f"gates.{name}", f"must be a number >= 0, got {v!r}")
        for name in ("min_agreement", "min_cosine"):
            if getattr(self, name) is not None and getattr(self, name) > 1:
                raise BadInput(f"gates.{name}", "is a fraction in [0, 1]")

    def active(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _quality_checks(gates: Gates, q: dict) -> list[dict]:
    out = []
    if gates.max_drop is not None and "drop_points" in q:
        allowed = allowed_drop(parse_max_drop(gates.max_drop), q["reference_accuracy"])
        out.append({"gate": "max_drop", "limit": round(allowed, 4), "value": q["drop_points"],
                    "passed": q["drop_points"] <= allowed + 1e-9})
    if gates.min_agreement is not None:
        out.append({"gate": "min_agreement", "limit": gates.min_agreement, "value": q["agreement"],
                    "passed": q["agreement"] >= gates.min_agreement})
    if gates.min_cosine is not None:
        out.append({"gate": "min_cosine", "limit": gates.min_cosine, "value": round(q["cosine_mean"], 6),
                    "passed": q["cosine_mean"] >= gates.min_cosine})
    if gates.max_size_mb is not None:
        mb = q["bytes"] / 1e6
        out.append({"gate": "max_size_mb", "limit": gates.max_size_mb, "value": round(mb, 4),
                    "passed": mb <= gates.max_size_mb})
    return out


def _speed_checks(gates: Gates, row: dict) -> list[dict]:
    out = []
    if gates.min_speedup is not None:
        out.append({"gate": "min_speedup", "limit": gates.min_speedup, "value": round(row["speedup"], 3),
                    "passed": row["speedup"] >= gates.min_speedup})
    if gates.max_p90_ms is not None:
        out.append({"gate": "max_p90_ms", "limit": gates.max_p90_ms, "value": round(row["p90_ms"], 4),
                    "passed": row["p90_ms"] <= gates.max_p90_ms})
    return out


# ---- the runner --------------------------------------------------------------------------------

def _registry():
    from .passes import PASSES

    return PASSES


def _pass_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def make_pass(name: str, settings: dict, calibration=None, where: str = "step"):
    """The pass ``name`` from the registry with ``settings``; ``calibration`` goes to a pass that
    has a ``calibration`` field. Unknown names and settings are errors with a suggestion."""
    passes = _registry()
    if name not in passes:
        near = difflib.get_close_matches(name, list(passes), n=1)
        raise BadInput(f"{where}.pass", f"unknown pass '{name}'",
                       f"did you mean '{near[0]}'?" if near else f"passes: {', '.join(sorted(passes))}")
    cls = passes[name]
    fields = _pass_fields(cls)
    for key in settings:
        if key not in fields or key == "calibration":
            near = difflib.get_close_matches(key, [f for f in fields if f != "calibration"], n=1)
            raise BadInput(f"{where}.{key}", f"'{key}' is not a setting of pass '{name}'",
                           f"did you mean '{near[0]}'?" if near else
                           f"settings: {', '.join(f for f in fields if f != 'calibration') or 'none'}")
    kwargs = dict(settings)
    if "calibration" in fields:
        kwargs["calibration"] = calibration
    for key, value in list(kwargs.items()):
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    try:
        return cls(**kwargs)
    except BadInput as e:
        raise BadInput(f"{where}.{e.where.lstrip('-').replace('-', '_')}", e.problem, e.hint) from None
    except TypeError as e:
        raise BadInput(where, f"pass '{name}': {e}") from None


def _settings_of(p) -> dict:
    if hasattr(p, "settings"):
        return p.settings()
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "calibration"}


def _data_key(feeds: list[dict] | None) -> str:
    return hashlib.sha256("".join(array_digest(f) for f in feeds or []).encode()).hexdigest()[:16]


def run_steps(model: onnx.ModelProto, steps: list[tuple[str, dict]], *, calibration: list[dict] | None = None,
              cache: Path | None = None, where: str = "steps") -> tuple[onnx.ModelProto, list[dict]]:
    """Run ``steps`` (pass name, settings) in order on ``model``; returns the result and one
    record per step. With ``cache``, a step whose input bytes, pass, settings and data were seen
    before is read back instead of run."""
    records = []
    current = model
    data_key = _data_key(calibration)
    for i, (name, settings) in enumerate(steps):
        p = make_pass(name, settings, calibration, where=f"{where}[{i}]")
        blob = model_bytes(current)
        key = hashlib.sha256(blob + json.dumps([name, _settings_of(p), data_key], sort_keys=True,
                                                default=str).encode()).hexdigest()[:24]
        rec = {"step": name, "settings": _settings_of(p), "bytes_before": len(blob), "cache_key": key}
        hit = cache / f"{key}.onnx" if cache else None
        t0 = time.perf_counter()
        if hit is not None and hit.exists():
            current = onnx.load(str(hit))
            rec["cached"] = True
            rec["stats"] = json.loads(hit.with_suffix(".json").read_text()) if hit.with_suffix(".json").exists() else {}
        else:
            result = p(ir.serde.deserialize_model(current))
            current = ir.serde.serialize_model(result.model)
            rec["cached"] = False
            rec["stats"] = result.stats
            if hit is not None:
                from .artifact import atomic_write_bytes, write_json as _wj

                atomic_write_bytes(hit, model_bytes(current))
                _wj(hit.with_suffix(".json"), result.stats)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["bytes_after"] = len(model_bytes(current))
        rec["nodes_before"], rec["nodes_after"] = rec["stats"].get("nodes_before"), rec["stats"].get("nodes_after")
        records.append(rec)
    return current, records


# ---- evaluation --------------------------------------------------------------------------------

def _quality(ref_out: np.ndarray, proto: onnx.ModelProto, ds: Dataset | None, where: str,
             classification: bool | None = None) -> dict:
    """Size, and with data: agreement with the reference (top-1 for classifiers, else min cosine;
    ``classification`` None = guessed from the output shape), mean cosine, accuracy with labels."""
    q: dict = {"bytes": len(model_bytes(proto))}
    if ds is None:
        return q
    out = predict(proto, ds, where=where)
    ag = agreement(ref_out, out, classification)
    if not ag.get("shape_ok", True):
        q["agreement"] = 0.0
        return q
    q["agreement"] = ag.get("top1_agreement", ag["cosine_min"])
    q["agreement_kind"] = "top-1 agreement" if "top1_agreement" in ag else "min cosine"
    q["cosine_min"] = ag["cosine_min"]
    r2, o2 = ref_out.reshape(len(ref_out), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    norms = np.linalg.norm(r2, axis=1) * np.linalg.norm(o2, axis=1)
    q["cosine_mean"] = float(np.mean(np.where(norms > 0, (r2 * o2).sum(1) / np.maximum(norms, 1e-300), 1.0)))
    if ds.labels is not None and out.ndim == 2:
        acc_r = float((ref_out.argmax(1) == ds.labels).mean())
        acc = float((out.argmax(1) == ds.labels).mean())
        q.update(accuracy=acc, reference_accuracy=acc_r, drop_points=round(100 * (acc_r - acc), 4))
    return q


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

def search_space(model: onnx.ModelProto, *, has_calibration: bool, target: str = "cpu") -> list[dict]:
    """Candidate step lists for ``model``, cheapest first. Only passes from the registry; a
    candidate whose passes are missing there is dropped."""
    from .passes._common import looks_like_transformer

    m = ir.serde.deserialize_model(model)
    is_tf, _ = looks_like_transformer(m)
    int8 = [("quant-preprocess", {}), ("quantize-static", {})]
    cands: list[dict] = []
    if target == "cuda":
        cands.append({"name": "fp16", "steps": [("fp16", {})]})
    elif is_tf:
        fuse = ("simplify", {"transformer": "bert", "gelu_approximation": True, "skip_layer_norm": False})
        cands += [{"name": "fused", "steps": [("simplify", {"transformer": "bert"})]},
                  {"name": "fused + dynamic INT8", "steps": [fuse, ("quantize-dynamic", {})]}]
    else:
        cands.append({"name": "simplified", "steps": [("simplify", {})]})
        if has_calibration:
            cands.append({"name": "INT8", "steps": list(int8)})
            # Light pruning first: it is what most often holds a tight gate. A prune step is
            # shared (through the step cache) by the INT8 and the fp32 variant built on it;
            # the fp32 ones come last, they are rarely the fastest.
            # Channel counts rounded to multiples of 8: ORT's CPU convolutions run odd widths far
            # slower (digits-cnn pruned 10% to 29/58 channels ran at 0.43x of dense).
            prunes = [("prune-channels", {"amount": a, "calibration_samples": PRUNE_CALIBRATION, "round_to": 8})
                      for a in (0.1, 0.25, 0.4, 0.5)]
            for p in prunes:
                cands.append({"name": f"pruned {p[1]['amount']:.0%} + INT8", "steps": [p] + int8})
            cands.append({"name": "INT8 qoperator", "steps": [int8[0], ("quantize-static", {"format": "qoperator"})]})
            for p in prunes:
                cands.append({"name": f"pruned {p[1]['amount']:.0%}", "steps": [p]})
    passes = _registry()
    return [c for c in cands if all(s[0] in passes for s in c["steps"])]


# ---- search / recipe execution -----------------------------------------------------------------

def _name_file(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace(" + ", "+").replace(" ", "-"))


def evaluate_variants(reference: Path, candidates: list[dict], *, data=None, gates: Gates | None = None,
                      settings: BenchSettings | None = None, out: Path, budget_s: float | None = None,
                      preprocess: str = "imagenet", cache: bool = True) -> dict:
    """Build every candidate from ``reference``, check quality gates, time the survivors side by
    side, choose the fastest that holds every gate. Writes variants, report.json/md/html to ``out``."""
    gates = gates or Gates()
    settings = settings or BenchSettings(batches=(1,), duration=2.0, memory=False)
    ref_proto = load_model(reference)
    prev = read_sidecar(reference)
    task = (prev or {}).get("task")
    classification = None if task is None else task == "classification"  # embeddings: no top-1
    eval_ds = eval_data(data, ref_proto, prev, preprocess)
    if gates.max_drop is not None and (eval_ds is None or eval_ds.labels is None):
        raise BadInput("gates.max_drop", "needs labelled data to measure accuracy", "pass --data")
    for name in ("min_agreement", "min_cosine"):
        if getattr(gates, name) is not None and eval_ds is None:
            raise BadInput(f"gates.{name}", "needs evaluation data", "pass --data")
    calib, calib_name = calibration_data(data, ref_proto, prev, eval_ds)
    calib_feeds = None
    if calib is not None:
        calib_feeds = [f for f, _ in head(calib, CALIBRATION_SAMPLES).batches(32)]
    ds = head(eval_ds, EVAL_SAMPLES) if eval_ds is not None else None
    ref_out = predict(ref_proto, ds, where="reference") if ds is not None else None
    out = Path(out)
    vdir = out / "variants"
    cache_dir = out / ".cache" if cache else None
    if cache_dir:
        cache_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    # The budget covers the whole search: keep room for the final side-by-side timing.
    n_configs = len(settings.batches) * max(1, len(settings.threads)) * len(settings.providers)
    build_budget = None if budget_s is None else budget_s - n_configs * (settings.duration + 3)
    variants = []
    step_seconds: dict[str, float] = {}  # the slowest run of each pass so far, to predict the next
    bar = progress(total=len(candidates), desc="candidates", unit="variant")
    for cand in candidates:
        rec: dict = {"name": cand["name"], "steps": [], "gates": []}
        if build_budget is not None and time.perf_counter() - t_start + _estimate(cand, step_seconds) > build_budget:
            rec.update(status="skipped", reason=f"time budget of {budget_s:g} s spent (or would be)")
            variants.append(rec)
            bar.update(1)
            continue
        try:
            start, pre_steps = ref_proto, []
            if "base" in cand:  # a variant that starts from another artifact (e.g. pruned + fine-tuned)
                base_path, pre_steps = cand["base"]()
                start = load_model(base_path)
            proto, steps = run_steps(start, cand["steps"], calibration=calib_feeds, cache=cache_dir,
                                     where=cand.get("where", "steps"))
            steps = pre_steps + steps
        except BadInput as e:
            if cand.get("strict"):
                raise
            rec.update(status="failed", reason=e.one_line())
            variants.append(rec)
            bar.update(1)
            continue
        for st in steps:
            if not st.get("cached") and "seconds" in st:
                step_seconds[st["step"]] = max(step_seconds.get(st["step"], 0.0), st["seconds"])
        rec["steps"] = steps
        q = _quality(ref_out, proto, ds, cand["name"], classification) if ds is not None \
            else {"bytes": len(model_bytes(proto))}
        rec.update(q)
        rec["gates"] = _quality_checks(gates, q)
        rec["status"] = "ok" if all(g["passed"] for g in rec["gates"]) else "rejected"
        path = vdir / f"{_name_file(cand['name'])}.onnx"
        meta = lineage(reference, {"step": "recipe", "variant": cand["name"], "passes": steps,
                                   "onnxopt": __version__})
        meta["quality"] = {k: v for k, v in q.items() if k != "bytes"}
        save_model(proto, path, meta)
        rec["path"] = str(path)
        variants.append(rec)
        bar.update(1)
    bar.close()
    build_s = time.perf_counter() - t_start

    survivors = [v for v in variants if v["status"] == "ok"]
    rows_by_name: dict = {}
    report_bench = None
    if survivors:
        report_bench = bench([reference] + [v["path"] for v in survivors], settings=settings,
                             data=eval_ds if eval_ds is not None and eval_ds.labels is not None else None,
                             names=["reference"] + [v["name"] for v in survivors])
        first = (report_bench["rows"][0]["provider"], report_bench["rows"][0]["threads"],
                 report_bench["rows"][0]["batch"])
        for row in report_bench["rows"]:
            if (row["provider"], row["threads"], row["batch"]) == first:
                rows_by_name[row["model"]] = row
    ref_row = rows_by_name.get("reference")
    for v in survivors:
        row = rows_by_name[v["name"]]
        v.update(p50_ms=row["p50_ms"], p90_ms=row["p90_ms"], speedup=row["speedup"])
        v["gates"] += _speed_checks(gates, row)
        if not all(g["passed"] for g in v["gates"]):
            v["status"] = "rejected"
    reference_row = {"name": "reference", "status": "reference", "bytes": len(model_bytes(ref_proto)),
                     "path": str(reference), "steps": []}
    if ref_row:
        reference_row.update(p50_ms=ref_row["p50_ms"], p90_ms=ref_row["p90_ms"], speedup=1.0)
    if ds is not None:
        reference_row.update(_quality(ref_out, ref_proto, ds, "reference", classification))
    timed = [r for r in [reference_row] + variants if "p50_ms" in r]
    front = pareto_front(timed) if timed else []
    for r in [reference_row] + variants:
        r["pareto"] = r["name"] in front
    passing = [v for v in variants if v["status"] == "ok"]
    chosen = min(passing, key=lambda v: v["p50_ms"]) if passing else None
    report = {
        "kind": "search", "out": str(out), "reference": str(reference), "data": getattr(eval_ds, "name", None),
        "calibration_data": calib_name, "gates": gates.active(), "settings": dataclasses.asdict(settings),
        "reference_row": reference_row, "variants": variants, "pareto_front": front,
        "chosen": chosen["name"] if chosen else None,
        "why": (f"fastest of {len(passing)} variant(s) that hold every gate ({chosen['speedup']:.2f}x vs the "
                f"reference at batch {settings.batches[0]})" if chosen else
                "no variant holds every gate"),
        "build_seconds": round(build_s, 2), "bench": report_bench, "onnxopt": __version__,
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
    return sum(step_seconds.get(name, worst) for name, _ in cand["steps"])


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

    int8 = [("quant-preprocess", {}), ("quantize-static", {})]
    out_c = []
    for a in amounts:
        b = base(a)
        out_c.append({"name": f"torch-pruned {a:.0%} + {epochs} epochs", "base": b, "steps": []})
        out_c.append({"name": f"torch-pruned {a:.0%} + {epochs} epochs + INT8", "base": b, "steps": int8})
    return out_c


def search(model: str | Path, out: str | Path, *, data=None, gates: Gates | None = None, target: str = "cpu",
           settings: BenchSettings | None = None, budget_s: float | None = None, preprocess: str = "imagenet",
           source: str | None = None) -> dict:
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
                               budget_s=budget_s, preprocess=preprocess)
    _raise_if_none(report, out)
    return report


def _raise_if_none(report: dict, out) -> None:
    if report["chosen"] is None:
        fails = []
        for v in report["variants"]:
            bad = [f"{g['gate']} {g['value']} vs {g['limit']}" for g in v.get("gates", []) if not g["passed"]]
            fails.append(f"{v['name']}: {', '.join(bad) or v.get('reason', v['status'])}")
        err = GateFailed(str(Path(out) / "report.json"), "no variant holds every gate (" + "; ".join(fails[:4])
                         + ("; ..." if len(fails) > 4 else "") + ")",
                         "loosen the gates or widen the search", report=report)
        raise err


# ---- recipes -----------------------------------------------------------------------------------

RECIPE_KEYS = {"model", "data", "preprocess", "target", "steps", "search", "gates", "out", "budget_s"}
TARGET_KEYS = {"provider", "threads", "batch", "duration"}
GATE_KEYS = {f.name for f in dataclasses.fields(Gates)}


def _yaml_nodes(text: str, path: str):
    import yaml

    try:
        return yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise BadInput(f"{path}{line}", f"is not valid YAML ({getattr(e, 'problem', None) or e})") from None


def _lines(node, prefix: str = "") -> dict[str, int]:
    """Key path -> line number (1-based) for every mapping key in a composed YAML node tree."""
    import yaml

    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            out[key] = k.start_mark.line + 1
            out.update(_lines(v, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            key = f"{prefix}[{i}]"
            out[key] = v.start_mark.line + 1
            out.update(_lines(v, key))
    return out


def load_recipe(path: str | Path) -> dict:
    """Read and validate a recipe (YAML or JSON) before any work starts. Errors name the file,
    the line and the key, and suggest the nearest valid name for a typo."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BadInput(str(path), "no such recipe file")
    text = path.read_text()
    node = _yaml_nodes(text, str(path))
    lines = _lines(node)
    raw = yaml.safe_load(text)

    def err(key: str, problem: str, hint: str | None = None):
        line = lines.get(key)
        return BadInput(f"{path}{':' + str(line) if line else ''}: {key}", problem, hint)

    def unknown(keys, allowed, prefix):
        for k in keys:
            if k not in allowed:
                near = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                raise err(f"{prefix}{k}", "unknown key",
                          f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(sorted(allowed))}")

    if not isinstance(raw, dict):
        raise BadInput(str(path), "a recipe is a mapping of keys (model, data, steps, gates, ...)")
    unknown(raw, RECIPE_KEYS, "")
    if "model" not in raw:
        raise BadInput(str(path), "has no 'model' key", "name a built-in model, a factory or an .onnx file")
    if "steps" in raw and "search" in raw:
        raise err("search", "a recipe has either steps or search, not both")
    target = raw.get("target") or {}
    if not isinstance(target, dict):
        raise err("target", "must be a mapping (provider, threads, batch, duration)")
    unknown(target, TARGET_KEYS, "target.")
    gates = raw.get("gates") or {}
    if not isinstance(gates, dict):
        raise err("gates", "must be a mapping")
    unknown(gates, GATE_KEYS, "gates.")
    try:
        gate_obj = Gates(**gates)
    except BadInput as e:
        raise err(e.where, e.problem, e.hint) from None
    steps = raw.get("steps")
    parsed_steps = []
    if steps is not None:
        if not isinstance(steps, list) or not steps:
            raise err("steps", "must be a non-empty list of {pass: NAME, ...settings}")
        for i, s in enumerate(steps):
            if isinstance(s, str):
                s = {"pass": s}
            if not isinstance(s, dict) or "pass" not in s:
                raise err(f"steps[{i}]", "each step is a mapping with a 'pass' key")
            settings = {k: v for k, v in s.items() if k != "pass"}
            try:
                make_pass(str(s["pass"]), settings, _PLACEHOLDER, where=f"steps[{i}]")
            except BadInput as e:
                raise err(e.where, e.problem, e.hint) from None
            parsed_steps.append((str(s["pass"]), settings))
    search_spec = raw.get("search")
    if search_spec not in (None, "auto", True):
        raise err("search", f"'{search_spec}' is not supported", "write 'search: auto'")
    if steps is None and search_spec is None:
        raise BadInput(str(path), "has neither 'steps' nor 'search'", "add steps: [...] or search: auto")
    batches = target.get("batch", [1])
    batches = [batches] if isinstance(batches, int) else batches
    threads = target.get("threads", [])
    threads = [threads] if isinstance(threads, int) else threads
    try:
        settings = BenchSettings(batches=tuple(int(b) for b in batches), threads=tuple(int(t) for t in threads),
                                 providers=(str(target.get("provider", "cpu")),),
                                 duration=float(target.get("duration", 2.0)), memory=False)
    except (BadInput, TypeError, ValueError) as e:
        raise err("target", getattr(e, "problem", str(e))) from None
    return {"path": str(path), "model": str(raw["model"]), "data": raw.get("data"),
            "preprocess": raw.get("preprocess", "imagenet"), "steps": parsed_steps or None,
            "search": steps is None, "gates": gate_obj, "settings": settings,
            "out": raw.get("out"), "budget_s": raw.get("budget_s")}


def run_recipe(path: str | Path, out: str | Path | None = None) -> dict:
    """Validate and run a recipe: export the source when it is a torch model, build the variant
    (steps) or search, check the gates, write the artifacts and report. Raises GateFailed (exit 3)
    when a gate fails; the report says which and by how much."""
    r = load_recipe(path)
    out = Path(out or r["out"] or Path("out") / Path(path).stem)
    reference = _reference(r["model"], out)
    if r["search"]:
        from .sources import is_onnx_path

        report = search(reference, out, data=r["data"], gates=r["gates"], settings=r["settings"],
                        budget_s=r["budget_s"], preprocess=r["preprocess"],
                        source=None if is_onnx_path(r["model"]) else r["model"])
    else:
        cands = [{"name": "recipe", "steps": r["steps"], "strict": True}]
        report = evaluate_variants(reference, cands, data=r["data"], gates=r["gates"], settings=r["settings"],
                                   out=out, preprocess=r["preprocess"])
        _raise_if_none(report, out)
    report["recipe"] = r["path"]
    return report


def _reference(model: str, out: Path) -> Path:
    """The fp32 reference as an artifact in ``out``: an .onnx is used in place (its sidecar
    kept), a torch source is exported and verified (and cached by its bytes)."""
    from .sources import is_onnx_path

    if is_onnx_path(model):
        load_model(model)
        return Path(model)
    from .export import export

    target = out / "reference.onnx"
    if not target.exists():
        export(model, target)
    return target
