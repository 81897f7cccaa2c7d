"""Render reports: terminal tables, markdown and JSON. One data structure, several views."""

from __future__ import annotations

import json

__all__ = ["table", "bench_table", "bench_markdown", "verification_table", "to_json", "human_bytes"]


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain monospace table; ``align`` has one 'l' or 'r' per column."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(vals):
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(vals, widths, align)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _bench_rows(report: dict) -> tuple[list[str], list[list]]:
    has_acc = any("accuracy" in r for r in report["rows"])
    headers = ["model", "prov", "thr", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s", "speedup",
               "size", "gzip", "load ms", "mem MB", "accuracy" if has_acc else "agreement"]
    rows = []
    for r in report["rows"]:
        if has_acc:
            quality = _fmt(r.get("accuracy"), 4)
        elif "agreement" in r:
            a = r["agreement"]
            if not a.get("shape_ok", True):
                quality = "shape differs"
            elif "top1_agreement" in a:
                quality = f"top1 {a['top1_agreement']:.3f} cos {a['cosine_min']:.4f}"
            else:
                quality = f"cos {a['cosine_min']:.4f}"
        else:
            quality = "reference"
        rows.append([r["model"], r["provider"], r["threads"], r["batch"], _fmt(r["p50_ms"]), _fmt(r["p90_ms"]),
                     _fmt(r["p99_ms"]), _fmt(r["throughput"], 1), f"{r['speedup']:.2f}x",
                     human_bytes(r.get("size_bytes")), human_bytes(r.get("size_gz_bytes")),
                     _fmt(r.get("load_ms"), 1), _fmt(r.get("peak_mem_mb"), 1), quality])
    return headers, rows


def bench_table(report: dict) -> str:
    headers, rows = _bench_rows(report)
    m = report["machine"]
    s = report["settings"]
    head = (f"reference: {report['reference']}  |  {m['cpu']}, {m['cores']} cores, onnxruntime "
            f"{m['onnxruntime']}  |  interleaved, {s['duration']}s per config, warm-up {s['warmup']}")
    notes = []
    if s.get("providers_skipped"):
        notes.append(f"skipped providers (not available): {', '.join(s['providers_skipped'])}")
    notes.append("speedup = reference p50 / model p50 in the same configuration; mem = memory a "
                 "fresh process adds to load the model and run one batch")
    return head + "\n" + table(headers, rows) + "\n" + "\n".join(notes)


def bench_markdown(report: dict, title: str = "Benchmark") -> str:
    headers, rows = _bench_rows(report)
    m = report["machine"]
    s = report["settings"]
    out = [f"# {title}", "",
           f"- machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}; onnxruntime {m['onnxruntime']}; "
           f"onnxopt {m['onnxopt']}",
           f"- method: variants interleaved round-robin in one run, {s['duration']} s of timed work per "
           f"configuration, warm-up {s['warmup']}, at least {s['min_rounds']} rounds, thread spinning off",
           f"- reference (speedup 1.00x): {report['reference']}",
           f"- dataset: {s.get('dataset') or 'none (agreement with the reference on random inputs)'}", ""]
    out.append("| " + " | ".join(headers) + " |")
    out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def verification_table(verification: dict | None) -> str:
    if not verification:
        return "verification: skipped"
    tol = verification["tolerance"]
    rows = []
    for c in verification["cases"]:
        shapes = ", ".join("x".join(map(str, s)) for s in c["shapes"].values())
        rows.append([c["case"], c["output"], shapes, _fmt(c.get("max_abs_err")), _fmt(c.get("cosine_min"), 6),
                     _fmt(c.get("top1_agreement")), "ok" if c["passed"] else "FAIL: " + "; ".join(c["reasons"])])
    head = (f"verification vs PyTorch (pass: max abs err <= {tol['atol']:g} + {tol['rtol']:g}*max|ref|, "
            f"cosine >= {tol['min_cosine']}, top-1 >= {tol['min_top1']}):")
    return head + "\n" + table(["case", "output", "input shapes", "max abs err", "cosine", "top-1", "result"],
                               rows, "lllrrrl")


def to_json(obj) -> str:
    from .artifact import _json_default

    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
