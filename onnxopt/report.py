"""Render reports: terminal tables, markdown and JSON. One data structure, several views."""

from __future__ import annotations

import json

__all__ = ["table", "bench_table", "bench_markdown", "verification_table", "to_json", "human_bytes",
           "search_table", "search_markdown", "search_html", "scatter_png"]


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


# ---- search / recipe reports -------------------------------------------------------------------

def _variant_rows(report: dict) -> tuple[list[str], list[list]]:
    rows = []
    has_acc = "accuracy" in report["reference_row"]
    headers = ["variant", "status", "accuracy" if has_acc else "agreement", "p50 ms", "p90 ms", "speedup", "size",
               "pareto", "gates"]
    for r in [report["reference_row"]] + report["variants"]:
        quality = r.get("accuracy") if has_acc else r.get("agreement")
        gates = "; ".join(f"{g['gate']} {'ok' if g['passed'] else 'FAIL'} ({_fmt(g['value'])} vs {_fmt(g['limit'])})"
                          for g in r.get("gates", [])) or r.get("reason", "")
        status = r["status"] + (" (chosen)" if r["name"] == report.get("chosen") else "")
        rows.append([r["name"], status, _fmt(quality, 4), _fmt(r.get("p50_ms")), _fmt(r.get("p90_ms")),
                     f"{r['speedup']:.2f}x" if r.get("speedup") else "-", human_bytes(r.get("bytes")),
                     "yes" if r.get("pareto") else "", gates])
    return headers, rows


def search_table(report: dict) -> str:
    headers, rows = _variant_rows(report)
    return table(headers, rows, "llrrrrrll") + f"\nchosen: {report.get('chosen') or 'none'} -- {report['why']}"


def scatter_png(report: dict) -> bytes | None:
    """Latency vs quality scatter (PNG bytes), the Pareto front joined by a line; None when
    matplotlib is missing or nothing was timed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    rows = [r for r in [report["reference_row"]] + report["variants"] if r.get("p50_ms") is not None]
    if not rows:
        return None
    key = "accuracy" if "accuracy" in report["reference_row"] else "agreement"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in rows:
        color = "tab:green" if r["name"] == report.get("chosen") else ("tab:blue" if r.get("pareto") else "tab:gray")
        ax.scatter(r["p50_ms"], r.get(key, 0.0), s=40 + r["bytes"] / max(x["bytes"] for x in rows) * 160,
                   color=color, alpha=0.8, edgecolors="black", linewidths=0.5)
        ax.annotate(r["name"], (r["p50_ms"], r.get(key, 0.0)), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["p50_ms"])
    if len(front) > 1:
        ax.plot([r["p50_ms"] for r in front], [r.get(key, 0.0) for r in front], "--", color="tab:blue", lw=1)
    ax.set_xlabel("p50 latency (ms), batch %s" % report["settings"]["batches"][0])
    ax.set_ylabel(key)
    ax.set_title("variants: latency vs %s (marker size = size on disk; green = chosen)" % key, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def search_markdown(report: dict) -> str:
    headers, rows = _variant_rows(report)
    out = ["# onnxopt search report", "",
           f"- reference: {report['reference']}", f"- data: {report.get('data') or 'none'}; calibration: "
           f"{report.get('calibration_data') or 'none'}",
           f"- gates: {json.dumps(report['gates'])}",
           f"- chosen: **{report.get('chosen') or 'none'}** -- {report['why']}",
           f"- Pareto front (latency, quality, size): {', '.join(report['pareto_front']) or '-'}",
           "- latencies: one interleaved run, thread spinning off; compare ratios within this table", "",
           "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    out += ["", "The HTML report (report.html) has the latency-vs-quality plot."]
    return "\n".join(out) + "\n"


def search_html(report: dict) -> str:
    """A self-contained page: summary, the scatter plot (PNG embedded), every variant's row."""
    import base64
    import html

    headers, rows = _variant_rows(report)
    png = scatter_png(report)
    # onload records the decoded size on <body>, so a headless browser test can tell it rendered
    img = (f'<img id="plot" alt="latency vs quality" onload="document.body.dataset.plot='
           f'this.naturalWidth+\'x\'+this.naturalHeight" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
           if png else '<p id="plot">(plot unavailable: install matplotlib, the "report" extra)</p>')
    head_cells = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "\n".join("<tr" + (' class="chosen"' if r[0] == report.get("chosen") else "") + ">"
                     + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    e = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>onnxopt report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}tr.chosen{{background:#e6f4e6}}
code{{background:#f4f4f4}}</style></head><body>
<h1>onnxopt search report</h1>
<ul><li>reference: <code>{e(report['reference'])}</code></li>
<li>data: {e(str(report.get('data') or 'none'))}; calibration: {e(str(report.get('calibration_data') or 'none'))}</li>
<li>gates: <code>{e(json.dumps(report['gates']))}</code></li>
<li>chosen: <b id="chosen">{e(str(report.get('chosen') or 'none'))}</b> &mdash; {e(report['why'])}</li>
<li>Pareto front: {e(', '.join(report['pareto_front']) or '-')}</li></ul>
{img}
<table id="variants"><thead><tr>{head_cells}</tr></thead><tbody>
{body}
</tbody></table>
<p>Latencies come from one interleaved run with thread spinning off; only ratios within this page are meaningful.</p>
</body></html>
"""
