"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so importable)."""

from __future__ import annotations

import json
from pathlib import Path


def without_temp_paths(obj, tmp: str):
    """The results with the temp folder the models lived in cut out of every string, so committed
    results name models, not one machine's temp paths."""
    prefix = str(tmp).rstrip("/") + "/"
    return json.loads(json.dumps(obj, default=str).replace(prefix, ""))


def without_machine_paths(obj, tmp: str | None = None):
    """:func:`without_temp_paths` (when ``tmp`` is given), and the installed packages' folder and
    the repository named instead of spelled out: committed results name files, not one machine."""
    import sysconfig

    if tmp is not None:
        obj = without_temp_paths(obj, tmp)
    root = str(Path(__file__).resolve().parents[1])
    text = json.dumps(obj, default=str).replace(sysconfig.get_paths()["purelib"], "<site-packages>")
    return json.loads(text.replace(root, "."))


def first_sample(npz) -> dict:
    """The first sample of a recorded-feeds (or plain) ``.npz``, as feeds at batch 1."""
    from onnxopt.feeds import load_dataset

    ds = load_dataset(str(npz), preprocess="raw")
    if ds.per_sample:
        return ds.samples[0]
    return {k: v[:1] if v.ndim else v for k, v in ds.inputs.items()}


def repeated_bench(paths, *, repeat: int = 1, **kwargs) -> dict:
    """``onnxopt.bench`` run ``repeat`` times (each run interleaves all variants), merged: every
    row's ``p50_ms`` and ``speedup`` become the median over the runs, and ``p50_runs`` /
    ``speedup_runs`` keep each run's figure. On a shared 2-core machine the speed of the moment
    moves a whole run (INT8 more than fp32), so the spread between runs is part of the result."""
    import statistics

    from onnxopt.bench import bench

    reps = [bench(paths, **kwargs) for _ in range(max(1, repeat))]
    merged = reps[0]
    for i, row in enumerate(merged["rows"]):
        p50 = [r["rows"][i]["p50_ms"] for r in reps]
        ratio = [r["rows"][i]["speedup"] for r in reps]
        row.update(p50_ms=statistics.median(p50), speedup=statistics.median(ratio),
                   p50_runs=[round(x, 4) for x in p50], speedup_runs=[round(x, 3) for x in ratio])
    merged["repeat"] = len(reps)
    return merged


def ratio_range(row: dict) -> str:
    """'2.41-2.52x over 3 runs' for a row of :func:`repeated_bench` (empty for one run)."""
    runs = row.get("speedup_runs") or []
    return f"{min(runs):.2f}-{max(runs):.2f}x over {len(runs)} runs" if len(runs) > 1 else ""


RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, results: dict, markdown: str) -> None:
    """Write ``results/<name>.json`` (sorted keys, stable for diffs) and ``results/<name>.md``,
    and print the markdown."""
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown.rstrip("\n"))
