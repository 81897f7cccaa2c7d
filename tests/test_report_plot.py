"""The search report's latency-vs-quality plot: the 2-D front as a monotone step line, marker area
= size on disk, names only where they help, hover titles in the HTML, deterministic bytes; and
report.rerender."""

from __future__ import annotations

import json
import re
import struct
from html.parser import HTMLParser

import pytest

from onnxopt.errors import BadInput
from onnxopt.report import (marker_area, pareto_2d, plot_points, rerender, scatter_figure, scatter_plot,
                            scatter_png, search_html)

# (name, p50 ms or None when never timed, accuracy, bytes, status)
_VARIANTS = [
    ("simplified", 9.6, 0.9867, 214_000, "rejected"),  # timed, fails min_speedup
    ("INT8", 4.1, 0.9844, 58_000, "ok"),
    ("pruned 10% + INT8", 3.9, 0.9844, 50_000, "ok"),
    ("pruned 25% + INT8", 3.2, 0.9822, 38_000, "ok"),
    ("pruned 40% + INT8", 2.7, 0.9733, 27_000, "ok"),
    ("pruned 50% + INT8", None, 0.9600, 22_000, "rejected"),  # fails max_drop: never timed
    ("INT8 qoperator", 4.4, 0.9844, 57_000, "ok"),
    ("pruned 10%", 8.9, 0.9867, 176_000, "ok"),
    ("pruned 25%", 7.1, 0.9856, 122_000, "ok"),
    ("pruned 40%", 5.6, 0.9800, 80_000, "ok"),
    ("pruned 50%", 4.9, 0.9733, 57_000, "ok"),
    ("torch-pruned 50% + 20 epochs", 4.8, 0.9889, 56_000, "ok"),
    ("torch-pruned 50% + 20 epochs + INT8", 2.1, 0.9867, 17_000, "ok"),
    ("torch-pruned 62% + 20 epochs", 3.9, 0.9856, 34_000, "ok"),
    ("torch-pruned 62% + 20 epochs + INT8", 1.9, 0.9822, 12_000, "ok"),
    ("torch-pruned 75% + 20 epochs", 3.1, 0.9800, 17_000, "ok"),
    ("torch-pruned 75% + 20 epochs + INT8", 2.3, 0.9778, 8_500, "ok"),  # smallest, not fastest
]


def _front_3_axes(rows: list[dict]) -> list[str]:
    """The table's front as evaluate_variants computes it: no other row is at least as good on
    latency, accuracy and size and better on one (kept here so the fixture does not depend on
    where the search code lives)."""
    def axes(r):
        return (r["p50_ms"], -r["accuracy"], r["bytes"])

    return [r["name"] for r in rows
            if not any(all(x <= y for x, y in zip(axes(o), axes(r))) and axes(o) != axes(r) for o in rows)]


def realistic_report() -> dict:
    """A digits-cnn-like search: reference + 17 variants (16 timed), in the shape evaluate_variants writes."""
    ref_acc, ref_p50 = 0.9867, 9.8
    reference_row = {"name": "reference", "status": "reference", "bytes": 215_000, "path": "ref.onnx", "steps": [],
                     "p50_ms": ref_p50, "p90_ms": ref_p50 * 1.1, "speedup": 1.0, "accuracy": ref_acc,
                     "reference_accuracy": ref_acc, "drop_points": 0.0}
    variants = []
    for name, p50, acc, nbytes, status in _VARIANTS:
        drop = round(100 * (ref_acc - acc), 4)
        v = {"name": name, "status": status, "bytes": nbytes, "accuracy": acc, "reference_accuracy": ref_acc,
             "drop_points": drop, "path": f"variants/{name}.onnx", "steps": [],
             "gates": [{"gate": "max_drop", "passed": drop <= 2.0, "value": drop, "limit": 2.0}]}
        if p50 is not None:
            v.update(p50_ms=p50, p90_ms=p50 * 1.1, speedup=round(ref_p50 / p50, 4))
            v["gates"].append({"gate": "min_speedup", "passed": ref_p50 / p50 >= 1.05, "value": ref_p50 / p50,
                               "limit": 1.05})
        variants.append(v)
    timed = [r for r in [reference_row] + variants if "p50_ms" in r]
    front = _front_3_axes(timed)
    for r in [reference_row] + variants:
        r["pareto"] = r["name"] in front
    passing = [v for v in variants if v["status"] == "ok"]
    chosen = min(passing, key=lambda v: v["p50_ms"])
    return {"kind": "search", "out": "out/digits-cnn", "reference": "out/digits-cnn/reference.onnx",
            "data": "digits", "calibration_data": "digits (train split)",
            "gates": {"max_drop": 2.0, "min_speedup": 1.05},
            "settings": {"batches": [450], "threads": [2], "duration": 0.5, "providers": ["CPUExecutionProvider"]},
            "reference_row": reference_row, "variants": variants, "pareto_front": front,
            "chosen": chosen["name"], "why": f"fastest of {len(passing)} variant(s) that hold every gate",
            "build_seconds": 12.0, "bench": None, "onnxopt": "test"}


@pytest.fixture
def report():
    pytest.importorskip("matplotlib")
    return realistic_report()


def _by_gid(artists, prefix):
    return {a.get_gid()[len(prefix):]: a for a in artists if (a.get_gid() or "").startswith(prefix)}


def test_fixture_front_zigzags_in_2d():
    """The bug the plot had: the 3-axis front, sorted by latency, goes down in quality somewhere."""
    r = realistic_report()
    front = sorted((x for x in [r["reference_row"]] + r["variants"] if x["pareto"]), key=lambda x: x["p50_ms"])
    q = [x["accuracy"] for x in front]
    assert any(b < a for a, b in zip(q, q[1:])), q
    assert len([x for x in r["variants"] if "p50_ms" in x]) + 1 == 17


def test_pareto_2d_matches_brute_force(report):
    rows = [x for x in [report["reference_row"]] + report["variants"] if "p50_ms" in x]

    def dominated(a):
        return any(b["p50_ms"] <= a["p50_ms"] and b["accuracy"] >= a["accuracy"]
                   and (b["p50_ms"] < a["p50_ms"] or b["accuracy"] > a["accuracy"]) for b in rows)

    expected = sorted((x["name"] for x in rows if not dominated(x)),
                      key=lambda n: next(x["p50_ms"] for x in rows if x["name"] == n))
    assert pareto_2d(report) == expected
    assert set(expected) != set(report["pareto_front"])  # independent of the table's 3-axis front
    assert report["pareto_front"] == realistic_report()["pareto_front"]  # and leaves it alone


def test_front_line_is_a_monotone_step_line(report):
    fig, points = scatter_figure(report)
    ax = fig.axes[0]
    lines = _by_gid(ax.lines, "front-2d")
    assert list(lines) == [""], [a.get_gid() for a in ax.lines]
    line = lines[""]
    assert line.get_drawstyle() == "steps-post"
    xs, ys = list(line.get_xdata()), list(line.get_ydata())
    assert xs == sorted(xs) and len(set(xs)) == len(xs)  # sorted by latency
    assert all(b >= a for a, b in zip(ys, ys[1:])), ys  # quality never goes down along the line
    by_name = {p["name"]: p for p in points}
    front = [by_name[n] for n in pareto_2d(report)]
    assert [(p["x"], p["y"]) for p in front] == list(zip(xs, ys))[:len(front)]  # through every front point
    assert xs[-1] == max(p["x"] for p in points)  # the last step runs to the slowest point


def test_labels_only_on_front_chosen_and_reference(report):
    fig, points = scatter_figure(report)
    ax = fig.axes[0]
    expected = set(pareto_2d(report)) | {report["chosen"], "reference"}
    labels = _by_gid(ax.texts, "label:")
    assert set(labels) == expected and len(expected) < len(points) / 2
    assert all(t.get_text() == name for name, t in labels.items())
    others = {p["name"] for p in points} - expected
    # no drawn text inside the axes names another variant; they carry their key number instead
    assert not [t.get_text() for t in ax.texts if t.get_text() in others]
    numbers = _by_gid(ax.texts, "number:")
    assert set(numbers) == others
    key = _by_gid(fig.texts, "key:")
    assert set(key) == others
    for name in others:
        n = next(p["number"] for p in points if p["name"] == name)
        assert numbers[name].get_text() == str(n)
        assert key[name].get_text().split(None, 1)[0] == str(n)
        assert name.startswith(key[name].get_text().split(None, 1)[1].rstrip("\u2026"))
    assert "1 variant(s) never timed" in _by_gid(fig.texts, "untimed")[""].get_text()


def test_labels_and_numbers_do_not_overlap(report):
    fig, _ = scatter_figure(report)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [(t.get_gid(), t.get_window_extent(renderer)) for t in ax.texts]
    assert len(boxes) == 17
    axbox = ax.get_window_extent(renderer)
    for i, (g, a) in enumerate(boxes):
        assert axbox.x0 <= a.x0 and a.x1 <= axbox.x1 and axbox.y0 <= a.y0 and a.y1 <= axbox.y1, g
        for h, b in boxes[i + 1:]:
            assert not a.overlaps(b), (g, h)


def test_marker_area_encodes_size(report):
    fig, points = scatter_figure(report)
    ax = fig.axes[0]
    markers = _by_gid(ax.collections, "point:")
    assert set(markers) == {p["name"] for p in points}
    drawn = sorted((p["bytes"], float(markers[p["name"]].get_sizes()[0])) for p in points)
    for (b1, a1), (b2, a2) in zip(drawn, drawn[1:]):
        if b2 > b1:
            assert a2 > a1, (b1, a1, b2, a2)
        else:
            assert a2 == a1
    biggest, smallest = drawn[-1], drawn[0]
    assert biggest[1] / smallest[1] > 5  # visibly different, not a token change
    assert marker_area(1000, 1000) > marker_area(500, 1000) > marker_area(0, 1000) > 0
    # the size legend uses the same scale: its marker for the largest file has the largest marker's area
    legend = next(lg for lg in fig.legends if lg.get_gid() == "legend-sizes")
    assert "size on disk" in legend.get_title().get_text()
    ms = [h.get_markersize() ** 2 for h in legend.legend_handles]
    assert len(ms) == 3 and ms == sorted(ms) and ms[-1] == pytest.approx(biggest[1])


class _Areas(HTMLParser):
    def __init__(self):
        super().__init__()
        self.areas, self.ids, self.img = [], set(), None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "area":
            self.areas.append(a)
        if tag == "img":
            self.img = a
        if "id" in a:
            self.ids.add(a["id"])


def test_html_has_a_hover_title_for_every_plotted_variant(report):
    page = search_html(report)
    parser = _Areas()
    parser.feed(page)
    assert parser.img["usemap"] == "#plotmap" and "plotmap" in parser.ids
    timed = [x["name"] for x in [report["reference_row"]] + report["variants"] if "p50_ms" in x]
    by_name = {a["data-variant"]: a for a in parser.areas}
    assert sorted(by_name) == sorted(timed) and len(parser.areas) == len(timed)
    for name, a in by_name.items():
        assert re.match(r"(#\d+ )?" + re.escape(name) + r" \(", a["title"]), a["title"]
        assert "ms" in a["title"] and "accuracy" in a["title"]
        assert a["href"][1:] in parser.ids  # links to the variant's table cell
        x, y, r = map(int, a["coords"].split(","))
        assert 0 <= x < 700 and 0 <= y < 450 and r >= 5
    assert "pruned 50% + INT8 (rejected)" in page  # the never-timed one is listed under the plot
    assert page.count("<tr") == len(report["variants"]) + 2  # the table is unchanged: header + rows


def test_image_map_points_at_the_markers(report):
    """The hover areas sit on the drawn markers: the chosen (green) point's area centre is green."""
    import io

    import matplotlib.image

    png, points = scatter_plot(report)
    img = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert img.shape[:2] == (450, 700)  # the size the chromium test expects
    parser = _Areas()
    parser.feed(search_html(report))
    area = next(a for a in parser.areas if a["data-variant"] == report["chosen"])
    x, y, _ = map(int, area["coords"].split(","))
    r, g, b = img[y, x, :3]
    assert g > r + 0.1 and g > b + 0.1, (r, g, b)
    ref = next(a for a in parser.areas if a["data-variant"] == "reference")
    x, y, _ = map(int, ref["coords"].split(","))
    r, g, b = img[y, x, :3]
    assert r > b + 0.2, (r, g, b)  # orange


def test_renders_are_byte_identical(report):
    png = scatter_png(report)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (700, 450)
    assert scatter_png(realistic_report()) == png
    assert search_html(report) == search_html(realistic_report())
    svg1, _ = scatter_plot(report, "svg")
    svg2, _ = scatter_plot(realistic_report(), "svg")
    assert svg1 == svg2 and b"<svg" in svg1
    other = realistic_report()
    other["variants"][1]["p50_ms"] = 3.0
    assert scatter_png(other) != png  # the bytes do depend on the data


def test_small_reports_still_plot():
    pytest.importorskip("matplotlib")
    r = realistic_report()
    r["variants"] = [v for v in r["variants"] if v["name"] == r["chosen"]]
    fig, points = scatter_figure(r)
    assert [p["name"] for p in points] == ["reference", r["chosen"]]
    assert all(p["label"] for p in points)
    r["variants"] = []
    r["reference_row"].pop("p50_ms")
    assert scatter_png(r) is None and plot_points(r) == []
    assert 'id="plot"' in search_html(r)


def test_no_chosen_and_no_data_still_plot():
    pytest.importorskip("matplotlib")
    r = realistic_report()
    r["chosen"] = None
    fig, points = scatter_figure(r)
    assert set(_by_gid(fig.axes[0].texts, "label:")) == set(pareto_2d(r)) | {"reference"}
    assert not any(p["kind"] == "chosen" for p in points)
    # no evaluation data: no quality anywhere; the fastest point alone is the front, the axis says so
    for row in [r["reference_row"]] + r["variants"]:
        row.pop("accuracy", None)
    fig, points = scatter_figure(r)
    assert pareto_2d(r) == ["torch-pruned 62% + 20 epochs + INT8"]
    assert "not measured" in fig.axes[0].get_ylabel()
    assert 'usemap="#plotmap"' in search_html(r)


def _write_report(folder, report):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_rerender_rewrites_md_and_html(report, tmp_path):
    folder = _write_report(tmp_path / "run", report)
    back = rerender(folder)
    assert back == json.loads((folder / "report.json").read_text())
    assert (folder / "report.html").read_text() == search_html(back)
    assert report["chosen"] in (folder / "report.md").read_text()


@pytest.mark.parametrize("content, needle", [
    (None, "has no report.json"),
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
    ('{"rows": [], "machine": {}}', "is not a search or recipe report"),
    ("[1, 2, 3]", "is not a search or recipe report"),
    ('{"kind": "search", "variants": []}', "incomplete search report"),
])
def test_rerender_errors_are_one_line(tmp_path, content, needle):
    folder = tmp_path / "run"
    folder.mkdir()
    if isinstance(content, bytes):
        (folder / "report.json").write_bytes(content)
    elif content is not None:
        (folder / "report.json").write_text(content)
    with pytest.raises(BadInput) as e:
        rerender(folder)
    line = e.value.one_line()
    assert needle in line and "\n" not in line and e.value.exit_code == 2
    assert str(folder) in line
    assert not (folder / "report.html").exists() and not (folder / "report.md").exists()


def test_rerender_damaged_rows_is_bad_input(report, tmp_path):
    report["variants"][2]["p50_ms"] = "fast"
    report["variants"][3].pop("status")
    folder = _write_report(tmp_path / "run", report)
    with pytest.raises(BadInput, match=re.escape("damaged search report")):
        rerender(folder)
    assert not (folder / "report.html").exists()
