"""Render reports: terminal tables, markdown and JSON. One data structure, several views."""

from __future__ import annotations

import json

__all__ = ["table", "bench_table", "bench_markdown", "verification_table", "to_json", "human_bytes",
           "search_table", "search_markdown", "search_html", "scatter_png", "scatter_plot", "scatter_figure",
           "plot_points", "pareto_2d", "marker_area", "rerender"]


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


# ---- the latency-vs-quality plot ---------------------------------------------------------------
#
# The plot draws the 2-D latency-vs-quality front (report["pareto_front"] is the 3-axis front of the
# table: a size win alone keeps a slow, worse variant on it, and drawn in 2-D that front zig-zags).
# Marker area encodes size on disk; only the front, the chosen variant and the reference carry
# their names, every other point a number that the key beside the axes resolves. In report.html an
# image map over the PNG gives every point a hover title and a link to its table row.

_FIG_IN = (7.0, 4.5)  # inches; at _DPI the PNG is 700 x 450 px
_DPI = 100
_AREA_MIN, _AREA_MAX = 16.0, 400.0  # marker area (points^2) of an empty file and of the largest one
_COLORS = {"chosen": "tab:green", "reference": "tab:orange", "ok": "tab:blue", "rejected": "tab:red"}
_KIND_LABEL = {"chosen": "chosen", "reference": "reference", "ok": "holds the gates",
               "rejected": "rejected by a gate"}
_AX_RECT = (0.095, 0.11, 0.575, 0.80)  # left, bottom, width, height (figure fractions)
_PANEL_X = 0.695  # where the legends and the key start


def _quality_key(report: dict) -> str:
    return "accuracy" if "accuracy" in report["reference_row"] else "agreement"


def _quality(row: dict, key: str) -> float:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def _timed_rows(report: dict) -> list[dict]:
    import math

    rows = [report["reference_row"]] + list(report["variants"])
    return [r for r in rows if isinstance(r.get("p50_ms"), (int, float)) and math.isfinite(r["p50_ms"])]


def pareto_2d(report: dict) -> list[str]:
    """Names on the 2-D latency-vs-quality front of the timed rows (reference included), fastest
    first: each one has strictly higher quality than every row at least as fast. This is the
    front the plot draws; ``report["pareto_front"]`` (latency, quality *and* size) is the table's."""
    key = _quality_key(report)
    rows = sorted(_timed_rows(report), key=lambda r: (float(r["p50_ms"]), -_quality(r, key)))
    front: list[str] = []
    best = None
    for r in rows:
        q = _quality(r, key)
        if best is None or q > best:
            front.append(r["name"])
            best = q
    return front


def marker_area(nbytes, max_bytes) -> float:
    """Marker area (points^2) for a file of ``nbytes``: affine in the size, so a bigger file always
    draws a bigger marker and equal byte differences give equal area differences."""
    frac = max(0.0, float(nbytes or 0)) / max_bytes if max_bytes and max_bytes > 0 else 1.0
    return _AREA_MIN + (_AREA_MAX - _AREA_MIN) * min(frac, 1.0)


def plot_points(report: dict) -> list[dict]:
    """What the plot shows, one dict per timed row in report order: ``name``, ``x`` (p50 ms),
    ``y`` (quality), ``bytes``, ``area``, ``kind`` (chosen/reference/ok/rejected), ``front``
    (on the 2-D front), ``label`` (drawn with its name), ``number`` (the key's number, for
    the points without a name label), ``row`` (its row in the table, reference = 0), ``title``
    (the hover text)."""
    key = _quality_key(report)
    rows = [report["reference_row"]] + list(report["variants"])
    timed = {id(r) for r in _timed_rows(report)}
    front = set(pareto_2d(report))
    chosen = report.get("chosen")
    max_bytes = max((float(r.get("bytes") or 0) for r in rows if id(r) in timed), default=0.0)
    points, number = [], 0
    for i, r in enumerate(rows):
        if id(r) not in timed:
            continue
        name = str(r["name"])
        if i == 0:
            kind = "reference"
        elif name == chosen:
            kind = "chosen"
        else:
            kind = "rejected" if r.get("status") == "rejected" else "ok"
        label = i == 0 or name == chosen or name in front
        if not label:
            number += 1
        p = {"name": name, "x": float(r["p50_ms"]), "y": _quality(r, key), "bytes": int(r.get("bytes") or 0),
             "area": marker_area(r.get("bytes"), max_bytes), "kind": kind, "front": name in front,
             "label": label, "number": None if label else number, "row": i}
        status = r.get("status", "-") + (", chosen" if name == chosen else "")
        quality = f"{key} {_fmt(p['y'], 4)}" if key in r else "quality not measured"
        p["title"] = (f"{'#%d ' % number if not label else ''}{name} ({status}): p50 {_fmt(p['x'])} ms, "
                      f"{quality}, {human_bytes(p['bytes'])} on disk"
                      + ("; on the latency-quality front" if p["front"] else ""))
        points.append(p)
    return points


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _place(ax, p: dict, text: str, size: float, renderer, placed: list, discs: list, box, **kw) -> None:
    """Annotate point ``p`` with ``text`` at the first of a fixed list of spots (near to far: above,
    below, beside; left-aligned, centred, right-aligned, or slid inside the axes) whose box, with
    2 px of clearance, overlaps no label placed so far, no marker, not the front line and stays in
    the axes; else at the least bad one. A far label gets a thin leader line. Deterministic."""
    from matplotlib.transforms import Bbox

    cx, cy, r = p["px"]
    probe = ax.annotate(text, (p["x"], p["y"]), xytext=(0, 0), textcoords="offset points", fontsize=size,
                        ha="left", va="bottom", **kw)
    bb0 = probe.get_window_extent(renderer)
    probe.remove()
    w, h = bb0.width, bb0.height
    px = _DPI / 72
    spots = []
    for dist in (1.5, 6, 12, 20, 32):
        d = r + dist * px
        up, down, mid = cy + d, cy - d - h, cy - h / 2
        right, left = cx + r * 0.6, cx - r * 0.6 - w
        centre = min(max(cx - w / 2, box.x0 + 3), box.x1 - 3 - w)  # centred, slid inside the axes
        spots += [(right, up), (right, down), (left, up), (left, down), (centre, up), (centre, down),
                  (cx + d, mid), (cx - d - w, mid)]
    best = None
    for x0, y0 in spots:
        bb = Bbox.from_bounds(x0, y0, w, h)
        padded = bb.padded(2.0)
        inside = Bbox.intersection(bb, box)
        outside = w * h - (inside.width * inside.height if inside is not None else 0.0)
        gap = max(0.0, max(bb.x0 - cx, cx - bb.x1, bb.y0 - cy, cy - bb.y1) - r)
        # overlapping another label is worst, leaving the axes next; a marker or the line is bad,
        # and every pixel away from the point costs a little (a far label is hard to attribute)
        score = (4 * sum(_overlap(padded, o) for o in placed) + sum(_overlap(padded, o) for o in discs)
                 + 6 * max(0.0, outside) + 1.5 * h * gap)
        if best is None or score < best[0] - 1e-9:
            best = (score, x0, y0, bb, gap)
    _, x0, y0, bb, gap = best
    arrow = {"arrowprops": {"arrowstyle": "-", "lw": 0.5, "color": "0.45", "shrinkA": 1, "shrinkB": 0}} \
        if gap > 8 * px else {}
    off = ((x0 - bb0.x0) / px, (y0 - bb0.y0) / px)  # in points, from where the probe drew it
    ann = ax.annotate(text, (p["x"], p["y"]), xytext=off, textcoords="offset points", fontsize=size,
                      ha="left", va="bottom", **kw, **arrow)
    # a light backing keeps a label readable where it had to cross the line or a marker
    ann.set_bbox({"boxstyle": "square,pad=0.05", "facecolor": "white", "edgecolor": "none", "alpha": 0.7})
    placed.append(bb)


def _truncate(fig, text: str, width_px: float, size: float, renderer) -> str:
    """``text`` cut (with an ellipsis) to fit ``width_px`` at font ``size``."""
    t = fig.text(0, 0, text, fontsize=size)
    full = text
    while t.get_window_extent(renderer).width > width_px and len(text) > 4:
        text = text[:-2]
        t.set_text(text.rstrip() + "\u2026")
    t.remove()
    return full if text == full else text.rstrip() + "\u2026"


def scatter_figure(report: dict):
    """``(figure, points)`` of the latency-vs-quality plot (a bare matplotlib Figure on the Agg
    canvas: no pyplot, no global backend switch), or None when matplotlib is missing or nothing was
    timed. ``points`` is :func:`plot_points` plus ``px`` (centre x, y and radius in display pixels,
    origin bottom-left)."""
    try:
        import matplotlib
        import matplotlib.style
    except ImportError:
        return None
    points = plot_points(report)
    if not points:
        return None
    with matplotlib.style.context("default"):  # the user's matplotlibrc must not change the bytes
        return _draw(report, points), points


def _draw(report: dict, points: list[dict]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIG_IN, dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes(_AX_RECT)
    fx, fy = _draw_points_and_front(ax, report, points)
    fig.canvas.draw()  # fixes the transforms; the labels are placed in display pixels
    renderer = fig.canvas.get_renderer()
    _draw_labels(ax, points, fx, fy, renderer)
    y = _draw_legends(fig, points, len(fx) > 1, renderer)
    _draw_numbered_key(fig, report, points, y, renderer)
    return fig


def _draw_points_and_front(ax, report: dict, points: list[dict]) -> tuple[list, list]:
    """The markers (area = size), the 2-D front as a step line, the axes' labels; returns the
    front's corner coordinates."""
    key = _quality_key(report)
    xs = [p["x"] for p in points]
    ys = [p["y"] for p in points]

    def span(lo, hi, pad_lo, pad_hi):
        d = (hi - lo) or max(abs(hi), 1e-3) * 0.1
        return lo - d * pad_lo, hi + d * pad_hi

    ax.set_xlim(*span(min(xs), max(xs), 0.12, 0.15))
    ax.set_ylim(*span(min(ys), max(ys), 0.15, 0.2))
    # big markers first, so a small one on top of a big one stays visible
    for z, p in enumerate(sorted(points, key=lambda p: (-p["area"], p["row"]))):
        ax.scatter([p["x"]], [p["y"]], s=[p["area"]], color=_COLORS[p["kind"]],
                   alpha=0.85 if p["kind"] != "ok" or p["front"] else 0.55, edgecolors="black",
                   linewidths=1.2 if p["kind"] == "chosen" else 0.5, zorder=3 + z * 0.01, gid=f"point:{p['name']}")
    by_name = {p["name"]: p for p in points}
    front = [by_name[n] for n in pareto_2d(report)]
    fx, fy = [p["x"] for p in front], [p["y"] for p in front]
    if max(xs) > fx[-1]:  # the best quality reachable stays the last step's up to the slowest point
        fx.append(max(xs))
        fy.append(fy[-1])
    if len(fx) > 1:
        ax.plot(fx, fy, "--", drawstyle="steps-post", color="tab:blue", lw=1, zorder=2, gid="front-2d")
    batches = (report.get("settings") or {}).get("batches") or ["?"]
    ax.set_xlabel(f"p50 latency (ms), batch {batches[0]}  (lower is better)", fontsize=8)
    measured = any(key in r for r in [report["reference_row"]] + list(report["variants"]))
    ax.set_ylabel(f"{key} (higher is better)" if measured else "quality not measured (no data)", fontsize=8)
    ax.set_title(f"variants: latency vs {key}; marker area = size on disk", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    return fx, fy


def _draw_labels(ax, points: list[dict], fx: list, fy: list, renderer) -> None:
    """Names on the front, the chosen and the reference; numbers on the rest, placed clear of
    markers, the step line and each other."""
    import math

    from matplotlib.transforms import Bbox

    discs = []
    for p in points:
        cx, cy = ax.transData.transform((p["x"], p["y"]))
        r = math.sqrt(p["area"]) / 2 * _DPI / 72
        p["px"] = (float(cx), float(cy), float(r))
        discs.append(Bbox.from_extents(cx - r, cy - r, cx + r, cy + r))
    if len(fx) > 1:  # the step line's segments are obstacles too: a name drawn across it is hard to read
        corners = [ax.transData.transform(xy) for xy in
                   [(fx[0], fy[0])] + [c for i in range(1, len(fx)) for c in ((fx[i], fy[i - 1]), (fx[i], fy[i]))]]
        for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
            discs.append(Bbox.from_extents(min(x0, x1) - 1.5, min(y0, y1) - 1.5, max(x0, x1) + 1.5, max(y0, y1) + 1.5))
    box = ax.get_window_extent(renderer)
    placed: list = []
    for p in sorted((p for p in points if p["label"]), key=lambda p: (p["row"] != 0, p["kind"] != "chosen", p["x"])):
        kw = {"fontweight": "bold", "color": "darkgreen"} if p["kind"] == "chosen" else {}
        _place(ax, p, p["name"], 7, renderer, placed, discs, box, gid=f"label:{p['name']}", zorder=6, **kw)
    for p in points:
        if p["number"] is not None:
            _place(ax, p, str(p["number"]), 6.5, renderer, placed, discs, box, gid=f"number:{p['name']}",
                   color="0.25", zorder=6)


def _draw_legends(fig, points: list[dict], has_front: bool, renderer) -> float:
    """Beside the axes: what the colours mean and a size legend; returns the figure y below them."""
    import math

    from matplotlib.lines import Line2D

    kinds = [k for k in ("chosen", "reference", "ok", "rejected") if any(p["kind"] == k for p in points)]
    handles = [Line2D([], [], ls="", marker="o", ms=6, mfc=_COLORS[k], mec="black", mew=0.5, label=_KIND_LABEL[k])
               for k in kinds]
    if has_front:
        handles.append(Line2D([], [], ls="--", color="tab:blue", lw=1, label="latency-quality front"))
    top = _AX_RECT[1] + _AX_RECT[3]
    leg = fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(_PANEL_X, top), fontsize=7,
                     frameon=False, borderaxespad=0, handletextpad=0.4, labelspacing=0.35)
    leg.set_gid("legend-kinds")
    sizes = sorted({p["bytes"] for p in points})
    picks = sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})
    max_bytes = max(sizes)
    size_handles = [Line2D([], [], ls="", marker="o", ms=math.sqrt(marker_area(b, max_bytes)), mfc="0.8",
                           mec="black", mew=0.5, label=human_bytes(b)) for b in picks]
    fig.canvas.draw()
    y = leg.get_window_extent(renderer).y0 / fig.bbox.height - 0.02
    leg2 = fig.legend(handles=size_handles, loc="upper left", bbox_to_anchor=(_PANEL_X, y), fontsize=6.5,
                      ncol=len(size_handles), frameon=False, borderaxespad=0, handletextpad=0.3, columnspacing=0.8,
                      title="size on disk (marker area)", title_fontsize=7, alignment="left")
    leg2.set_gid("legend-sizes")
    fig.canvas.draw()
    return leg2.get_window_extent(renderer).y0 / fig.bbox.height - 0.03


def _draw_numbered_key(fig, report: dict, points: list[dict], y: float, renderer) -> None:
    """The key from the numbers on the plot to the variants' names, and the untimed count."""
    numbered = [p for p in points if p["number"] is not None]
    untimed = len(report["variants"]) + 1 - len(points)
    if numbered:
        fig.text(_PANEL_X, y, "numbered points", fontsize=7, fontweight="bold", va="top", gid="key-title")
        line = 10.5 / fig.bbox.height
        y -= line * 1.2
        bottom = 0.02 + (line if untimed else 0)
        fit = max(1, int((y - bottom) / line) + 1)
        cols = 1 if len(numbered) <= fit else 2
        shown = numbered if len(numbered) <= fit * cols else numbered[:fit * cols - 1]
        col_w = (1 - _PANEL_X - 0.01) / cols
        for j, p in enumerate(shown):
            c, k = divmod(j, fit)
            text = _truncate(fig, f"{p['number']:>2}  {p['name']}", col_w * fig.bbox.width - 4, 6.5, renderer)
            fig.text(_PANEL_X + c * col_w, y - k * line, text, fontsize=6.5, va="top", gid=f"key:{p['name']}")
        if len(shown) < len(numbered):
            c, k = divmod(len(shown), fit)
            fig.text(_PANEL_X + c * col_w, y - k * line, f"+{len(numbered) - len(shown)} more (hover them)",
                     fontsize=6.5, va="top", style="italic")
    if untimed:
        fig.text(_PANEL_X, 0.02, f"{untimed} variant(s) never timed: see the table", fontsize=6.5,
                 style="italic", gid="untimed")


def _save(fig, fmt: str) -> bytes:
    import io

    import matplotlib.style

    buf = io.BytesIO()
    with matplotlib.style.context("default"):
        if fmt == "svg":
            with matplotlib.rc_context({"svg.hashsalt": "onnxopt", "svg.fonttype": "path"}):
                fig.savefig(buf, format="svg", dpi=_DPI, metadata={"Date": None, "Creator": None})
        else:
            fig.savefig(buf, format=fmt, dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def scatter_plot(report: dict, fmt: str = "png") -> tuple[bytes, list[dict]] | None:
    """The plot's bytes (``fmt``: png or svg; the same report gives the same bytes) and its
    :func:`plot_points` with ``px``; None when matplotlib is missing or nothing was timed."""
    made = scatter_figure(report)
    if made is None:
        return None
    fig, points = made
    return _save(fig, fmt), points


def scatter_png(report: dict) -> bytes | None:
    """Latency vs quality scatter (PNG bytes, 700 x 450): the 2-D front as a step line, marker area
    = size on disk; None when matplotlib is missing or nothing was timed."""
    made = scatter_plot(report, "png")
    return made[0] if made else None


def _image_map(points: list[dict]) -> str:
    """``<map>`` areas over the PNG, one per point with its hover title and a link to its table
    row; the smallest markers first, so where markers overlap the small one wins."""
    import html

    height = _FIG_IN[1] * _DPI
    areas = []
    for p in sorted(points, key=lambda p: (p["area"], p["row"])):
        cx, cy, r = p["px"]
        t = html.escape(p["title"])
        areas.append(f'<area shape="circle" coords="{round(cx)},{round(height - cy)},{max(5, round(r))}" '
                     f'href="#v-{p["row"]}" data-variant="{html.escape(p["name"])}" title="{t}" alt="{t}">')
    return '<map name="plotmap" id="plotmap">\n' + "\n".join(areas) + "\n</map>"


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
    """A self-contained page: summary, the scatter plot (PNG embedded, an image map gives every
    point a hover title and a link to its row), every variant's row."""
    import base64
    import html

    headers, rows = _variant_rows(report)
    plot = scatter_plot(report)
    # onload records the decoded size on <body>, so a headless browser test can tell it rendered
    if plot:
        png, points = plot
        img = (f'<img id="plot" usemap="#plotmap" alt="latency vs quality" onload="document.body.dataset.plot='
               f'this.naturalWidth+\'x\'+this.naturalHeight" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
               f"\n{_image_map(points)}")
        plotted = {p["row"] for p in points}
        untimed = [r for i, r in enumerate([report["reference_row"]] + list(report["variants"])) if i not in plotted]
        img += ('\n<p class="note">Dashed step line: the latency-vs-quality front (no faster variant has '
                "higher quality). The table's pareto column is the 3-axis front (latency, quality and size). "
                "Hover a point for its name and numbers; click it to jump to its row.</p>")
        if untimed:
            img += ('\n<p class="note" id="not-plotted">Not on the plot (never timed): '
                    + "; ".join(html.escape(f"{r['name']} ({r.get('status', '-')})") for r in untimed) + "</p>")
    else:
        img = '<p id="plot">(plot unavailable: install matplotlib, the "report" extra)</p>'
    head_cells = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "\n".join("<tr" + (' class="chosen"' if r[0] == report.get("chosen") else "") + ">"
                     + "".join((f'<td id="v-{i}">' if j == 0 else "<td>") + f"{html.escape(str(c))}</td>"
                               for j, c in enumerate(r)) + "</tr>" for i, r in enumerate(rows))
    e = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>onnxopt report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}tr.chosen{{background:#e6f4e6}}
td:target{{background:#fff3b0}}p.note{{font-size:12px;color:#555}}
code{{background:#f4f4f4}}</style></head><body>
<h1>onnxopt search report</h1>
<ul><li>reference: <code>{e(report['reference'])}</code></li>
<li>data: {e(str(report.get('data') or 'none'))}; calibration: {e(str(report.get('calibration_data') or 'none'))}</li>
<li>gates: <code>{e(json.dumps(report['gates']))}</code></li>
<li>chosen: <b id="chosen">{e(str(report.get('chosen') or 'none'))}</b> &mdash; {e(report['why'])}</li>
<li>Pareto front (latency, quality, size): {e(', '.join(report['pareto_front']) or '-')}</li></ul>
{img}
<table id="variants"><thead><tr>{head_cells}</tr></thead><tbody>
{body}
</tbody></table>
<p>Latencies come from one interleaved run with thread spinning off; only ratios within this page are meaningful.</p>
</body></html>
"""


_REPORT_KEYS = ("reference", "reference_row", "variants", "pareto_front", "gates", "why")


def rerender(folder) -> dict:
    """Re-write ``folder``/report.md and report.html from ``folder``/report.json (which is left as
    it is) and return the report. :class:`~onnxopt.errors.BadInput` with a one-line message when
    report.json is missing, unreadable, not JSON, not a search/recipe report or too damaged to
    render; nothing is written then."""
    from pathlib import Path

    from .artifact import write_text
    from .errors import BadInput, first_line

    folder = Path(folder)
    path = folder / "report.json"
    if not path.is_file():
        raise BadInput(str(folder), "has no report.json", "point at a folder written by optimize --max-drop or run")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BadInput(str(path), f"cannot be read ({first_line(e)})") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise BadInput(str(path), "is not valid JSON") from None
    if not isinstance(report, dict) or report.get("kind") != "search":
        raise BadInput(str(path), "is not a search or recipe report", "run optimize with a gate, or onnxopt run")
    missing = [k for k in _REPORT_KEYS if k not in report]
    if missing:
        raise BadInput(str(path), f"is an incomplete search report (no {', '.join(missing)})")
    rows = report["variants"]
    if not isinstance(report["reference_row"], dict) or not isinstance(rows, list) \
            or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise BadInput(str(path), "is a damaged search report (reference_row or variants malformed)")
    try:
        md, page = search_markdown(report), search_html(report)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise BadInput(str(path), f"is a damaged search report ({type(e).__name__}: {first_line(e)})") from None
    write_text(folder / "report.md", md)
    write_text(folder / "report.html", page)
    return report
