"""Declarative pipelines: ``onnxopt run recipe.yaml``.

A recipe names a model, data, a target, either ``steps`` (passes from
:data:`onnxopt.passes.PASSES` with their settings -- the passes' dataclass fields are the schema)
or ``search: auto``, and ``gates`` (the fields of :class:`onnxopt.gates.Gates`). It is validated
before any work starts; then its steps run through the one runner (:mod:`onnxopt.runner`) and are
judged by :func:`onnxopt.search.evaluate_variants`, the same way the search judges its variants.
Steps are cached by content hash, so re-running a recipe reuses finished steps and gives the same
bytes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path

from .artifact import load_model
from .bench import BenchSettings
from .errors import BadInput, first_line
from .gates import Gates
from .runner import make_pass
from .search import evaluate_variants, raise_if_none, search

__all__ = ["run_recipe", "load_recipe", "run_fleet", "RECIPE_KEYS"]

_PLACEHOLDER = object()  # stands in for calibration data when a recipe's steps are validated


# ---- recipes -----------------------------------------------------------------------------------

RECIPE_KEYS = {"model", "data", "preprocess", "target", "steps", "search", "gates", "out", "budget_s"}
TARGET_KEYS = {"provider", "threads", "batch", "duration"}
GATE_KEYS = {f.name for f in dataclasses.fields(Gates)}


# A recipe is a page of YAML: more aliases than this is an alias bomb ("billion laughs"), whose
# expansion (or a walk of it) takes minutes from a few hundred bytes.
MAX_ALIASES = 32
MAX_RECIPE_BYTES = 1 << 20


def _yaml_nodes(text: str, path: str):
    import yaml

    try:
        aliases = sum(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(text))
        if aliases > MAX_ALIASES:
            raise BadInput(path, f"uses {aliases} YAML aliases (at most {MAX_ALIASES}): it expands to far more "
                           "than it says", "write the values out")
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
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise BadInput(str(path), f"is {path.stat().st_size:,} bytes; a recipe is a page of YAML or JSON")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInput(str(path), "is not a text file (not UTF-8): a recipe is YAML or JSON") from None
    node = _yaml_nodes(text, str(path))
    lines = _lines(node)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:  # e.g. a !!python/object tag: never constructed, refused
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise BadInput(where, f"cannot be read as plain data ({first_line(getattr(e, 'problem', None) or e, 120)})",
                       "recipes hold only strings, numbers, lists and mappings") from None

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
    for key in ("model", "data", "out", "preprocess"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise err(key, f"must be a string, got {type(raw[key]).__name__} {str(raw[key])[:40]!r}")
    budget = raw.get("budget_s")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget <= 0):
        raise err("budget_s", f"must be a number of seconds > 0, got {str(budget)[:40]!r}")
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
            "search": steps is None, "gates": gate_obj if steps is None else gate_obj.for_variant(), "settings": settings,
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
        raise_if_none(report, out)
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


# ---- many recipes: the fleet ------------------------------------------------------------------

def _fleet_one(_shared, item: tuple[str, str]) -> dict:
    """One recipe of a fleet, run where the executor puts it; a failed gate is a row, not a stop."""
    from .errors import GateFailed

    path, out = item
    row = {"recipe": path, "out": out, "report": str(Path(out) / "report.json")}
    try:
        report = run_recipe(path, out)
    except GateFailed as e:
        report = e.report if isinstance(e.report, dict) else {}
        row.update(status="gate failed", problem=e.problem)
    else:
        row["status"] = "ok"
    chosen = next((v for v in report.get("variants", []) if v["name"] == report.get("chosen")), None)
    ref = report.get("reference_row") or {}
    row.update(model=report.get("reference"), chosen=report.get("chosen"),
               speedup=chosen.get("speedup") if chosen else None,
               bytes=chosen.get("bytes") if chosen else None, reference_bytes=ref.get("bytes"))
    return row


def run_fleet(paths: list[str | Path], out: str | Path | None = None, *, executor=None) -> dict:
    """Run many recipes, one task per recipe (:mod:`onnxopt.executor`: local, or Ray), each into
    ``out/<recipe name>``; gather their results into ``out/fleet.json`` and ``fleet.md``. Every
    recipe is validated before any runs. Raises GateFailed (exit 3, the fleet as its report) when
    any recipe failed a gate; the index is written either way."""
    from .artifact import write_json, write_text
    from .errors import GateFailed
    from .executor import map_tasks, parse_executor

    ex = parse_executor(executor)
    paths = [Path(p) for p in paths]
    for p in paths:
        load_recipe(p)
    stems = [p.stem for p in paths]
    dup = next((s for s in stems if stems.count(s) > 1), None)
    if dup is not None:
        raise BadInput(str(next(p for p in paths if p.stem == dup)), f"two recipes are named '{dup}': their "
                       "outputs would share a folder", "rename one")
    out = Path(out or Path("out") / "fleet")
    items = [(str(p), str(out / p.stem)) for p in paths]
    done = map_tasks(ex, _fleet_one, items)
    rows = [dict(row, ran_in=where) if where else row for row, where in done]
    fleet = {"kind": "fleet", "executor": ex.describe(), "out": str(out), "recipes": rows,
             "passed": all(r["status"] == "ok" for r in rows)}
    write_json(out / "fleet.json", fleet)
    write_text(out / "fleet.md", fleet_markdown(fleet))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise GateFailed(str(out / "fleet.json"), f"{len(failed)} of {len(rows)} recipe(s) failed a gate ("
                         + "; ".join(f"{Path(r['recipe']).name}: {r.get('problem', r['status'])}" for r in failed[:3])
                         + ")", "each recipe's report.json says which gate and by how much", report=fleet)
    return fleet


def fleet_markdown(fleet: dict) -> str:
    from .report import human_bytes, table

    rows = [[Path(r["recipe"]).name, r["status"], r.get("chosen") or "-",
             f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
             human_bytes(r.get("reference_bytes")), human_bytes(r.get("bytes")), r["report"]]
            for r in fleet["recipes"]]
    head = ["recipe", "status", "chosen", "speed-up", "reference", "chosen size", "report"]
    ok = sum(r["status"] == "ok" for r in fleet["recipes"])
    return (f"# Fleet: {ok} of {len(fleet['recipes'])} recipe(s) hold every gate\n\n"
            f"executor: {fleet['executor']['kind']}\n\n```\n{table(head, rows)}\n```\n")
