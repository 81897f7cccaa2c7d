"""Recipes, gates, the auto search and the search reports (HTML rendered in headless chromium)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest

from onnxopt.bench import BenchSettings
from onnxopt.errors import BadInput, GateFailed
from onnxopt.gates import Gates
from onnxopt.recipe import load_recipe, run_recipe
from onnxopt.runner import run_steps
from onnxopt.search import pareto_front, search
from onnxopt.runtime import make_session
from test_cli import _assert_clean_error, run_cli
from test_quantize import make_cnn

FAST = {"batch": [1], "duration": 0.2}


@pytest.fixture
def cnn_case(tmp_path):
    proto = make_cnn()
    src = tmp_path / "cnn.onnx"
    onnx.save(proto, src)
    x = np.random.default_rng(3).standard_normal((64, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=make_session(proto).run(None, {"x": x})[0].argmax(1))
    return src, tmp_path / "d.npz"


def _write(path, obj):
    path.write_text(json.dumps(obj) if path.suffix == ".json" else obj)
    return path


def test_gates_validate():
    with pytest.raises(BadInput, match="gates.min_speedup"):
        Gates(min_speedup=-1)
    with pytest.raises(BadInput, match="gates.min_agreement"):
        Gates(min_agreement=2)
    with pytest.raises(BadInput, match="--max-drop"):
        Gates(max_drop="lots")
    assert Gates(max_drop="1%rel").active() == {"max_drop": "1%rel"}


@pytest.mark.parametrize("text, where, problem", [
    ("model: m.onnx\ndata: d.npz\nsteps:\n  - pass: prune-channels\n    amout: 0.25\n",
     ":5: steps[0].amout", "did you mean 'amount'"),
    ("model: m.onnx\ngatez: {max_drop: 1}\nsteps: [quantize-static]\n", ":2: gatez", "did you mean 'gates'"),
    ("model: m.onnx\nsteps: [quantize-statik]\n", "steps[0].pass", "did you mean 'quantize-static'"),
    ("model: m.onnx\nsteps: [simplify]\nsearch: auto\n", ":3: search", "either steps or search"),
    ("data: digits\nsteps: [simplify]\n", "r.yaml", "no 'model' key"),
    ("model: m.onnx\nsteps: [simplify]\ngates: {min_speedup: -2}\n", "gates.min_speedup", ">= 0"),
    ("model: m.onnx\nsteps:\n  - pass: simplify\n    level: all\n", "steps[0].level", "hardware-specific"),
    ("model: [unclosed\n", "r.yaml:", "not valid YAML"),
    ("model: m.onnx\ntarget: {batch: [0]}\nsteps: [simplify]\n", ":2: target", "batch sizes"),
    ("model: m.onnx\n", "r.yaml", "neither 'steps' nor 'search'"),
])
def test_recipe_validation_names_line_and_key(tmp_path, text, where, problem):
    path = _write(tmp_path / "r.yaml", text)
    with pytest.raises(BadInput) as e:
        load_recipe(path)
    assert where in e.value.one_line() and problem in e.value.one_line(), e.value.one_line()


def test_recipe_steps_gates_and_cache(cnn_case, tmp_path):
    src, data = cnn_case
    recipe = _write(tmp_path / "r.json", {"model": str(src), "data": str(data), "target": FAST,
                                          "steps": [{"pass": "quant-preprocess"}, {"pass": "quantize-static"}],
                                          "gates": {"max_drop": 50, "max_size_mb": 1}})
    report = run_recipe(recipe, tmp_path / "out")
    v = report["variants"][0]
    assert report["chosen"] == "recipe" and v["status"] == "ok"
    assert [s["step"] for s in v["steps"]] == ["quant-preprocess", "quantize-static"]
    assert {g["gate"] for g in v["gates"]} == {"max_drop", "max_size_mb"} and all(g["passed"] for g in v["gates"])
    best = (tmp_path / "out" / "best.onnx").read_bytes()
    again = run_recipe(recipe, tmp_path / "out")
    assert all(s["cached"] for s in again["variants"][0]["steps"])  # finished steps reused
    assert (tmp_path / "out" / "best.onnx").read_bytes() == best  # and the same bytes
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp_path / "out" / name).exists()


def test_recipe_gate_failure_says_which(cnn_case, tmp_path):
    src, data = cnn_case
    recipe = _write(tmp_path / "r.json", {"model": str(src), "data": str(data), "target": FAST,
                                          "steps": ["simplify"], "gates": {"min_speedup": 50}})
    with pytest.raises(GateFailed, match="min_speedup") as e:
        run_recipe(recipe, tmp_path / "out")
    assert e.value.exit_code == 3 and e.value.report["chosen"] is None
    assert (tmp_path / "out" / "report.json").exists()  # the report is written either way


def test_run_steps_injects_calibration(cnn_case):
    src, data = cnn_case
    x = np.load(data)["x"]
    out, recs = run_steps(onnx.load(src), [("prune-channels", {"amount": 0.5, "round_to": 1}), ("quant-preprocess", {}),
                                           ("quantize-static", {})], calibration=[{"x": x}])
    assert [r["step"] for r in recs] == ["prune-channels", "quant-preprocess", "quantize-static"]
    assert recs[0]["stats"]["params_ratio"] < 0.8 and recs[0]["bytes_after"] < recs[0]["bytes_before"]
    assert any(n.op_type == "QuantizeLinear" for n in out.graph.node)
    with pytest.raises(BadInput, match="unknown pass 'prune'"):
        run_steps(onnx.load(src), [("prune", {})])


def test_pareto_front():
    rows = [{"name": "a", "p50_ms": 1.0, "accuracy": 0.90, "bytes": 10},
            {"name": "b", "p50_ms": 2.0, "accuracy": 0.95, "bytes": 10},
            {"name": "c", "p50_ms": 2.5, "accuracy": 0.94, "bytes": 20},  # dominated by b
            {"name": "d", "p50_ms": 3.0, "accuracy": 0.95, "bytes": 5}]
    assert pareto_front(rows) == ["a", "b", "d"]


def test_auto_search_on_digits_holds_the_gate(tmp_path):
    pytest.importorskip("torch")
    import onnxopt

    src = tmp_path / "digits.onnx"
    onnxopt.export("digits-cnn", src)
    report = search(src, tmp_path / "s", data="digits", gates=Gates(max_drop=0.5),
                    settings=BenchSettings(batches=(64,), duration=0.3, memory=False, threads=(2,)))
    chosen = next(v for v in report["variants"] if v["name"] == report["chosen"])
    assert chosen["drop_points"] <= 0.5 and chosen["speedup"] > 1.0
    names = {v["name"] for v in report["variants"]}
    assert {"INT8", "pruned 50%", "pruned 25% + INT8"} <= names
    rejected = [v for v in report["variants"] if v["status"] == "rejected"]
    assert all("p50_ms" not in v for v in rejected if any(g["gate"] == "max_drop" and not g["passed"]
                                                        for g in v["gates"]))  # never timed
    assert report["pareto_front"] and (tmp_path / "s" / "best.onnx").exists()


def test_html_report_renders_in_chromium(cnn_case, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("matplotlib")
    src, data = cnn_case
    recipe = _write(tmp_path / "r.json", {"model": str(src), "data": str(data), "target": FAST,
                                          "steps": ["quant-preprocess", "quantize-static"]})
    run_recipe(recipe, tmp_path / "out")
    page = tmp_path / "out" / "report.html"
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--virtual-time-budget=3000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-plot="700x450"' in dom  # the embedded PNG plot decoded at its size
    assert dom.count("<tr") == 3  # header + reference + the recipe's variant
    assert '<tr class="chosen">' in dom


def test_run_and_report_from_the_shell(cnn_case, tmp_path):
    src, data = cnn_case
    ok = _write(tmp_path / "ok.yaml", f"model: {src}\ndata: {data}\ntarget: {{batch: [1], duration: 0.2}}\n"
                "steps: [quant-preprocess, quantize-static]\ngates: {max_drop: 50}\n")
    res = run_cli("run", ok, "-o", tmp_path / "o1")
    assert res.returncode == 0, res.stderr
    assert "recipe" in res.stdout and "(chosen)" in res.stdout
    res = run_cli("report", tmp_path / "o1")
    assert res.returncode == 0 and "chosen: recipe" in res.stdout
    bad = _write(tmp_path / "bad.yaml", f"model: {src}\nsteps: [simplify]\ngates: {{min_speedup: 50}}\n"
                 "target: {batch: [1], duration: 0.2}\n")
    res = run_cli("run", bad, "-o", tmp_path / "o2")
    assert res.returncode == 3 and "min_speedup" in res.stderr and "Traceback" not in res.stderr
    typo = _write(tmp_path / "typo.yaml", f"model: {src}\nstep: [simplify]\n")
    _assert_clean_error(run_cli("run", typo, "-o", tmp_path / "o3"), tmp_path / "o3" / "report.json",
                        "typo.yaml:2: step", "did you mean 'steps'")


def test_digits_recipes_pass_and_fail_from_the_shell(tmp_path):
    pytest.importorskip("torch")
    body = ("model: digits-cnn\ndata: digits\ntarget: {batch: [450], threads: 2, duration: 0.5}\n"
            "steps:\n  - pass: prune-channels\n    amount: 0.25\n  - quant-preprocess\n  - quantize-static\n")
    ok = _write(tmp_path / "ok.yaml", body + "gates: {max_drop: 0.5, max_size_mb: 0.1}\n")
    res = run_cli("run", ok, "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    v = report["variants"][0]
    assert v["drop_points"] <= 0.5 and v["bytes"] < 100_000 and report["chosen"] == "recipe"
    fail = _write(tmp_path / "fail.yaml", body + "gates: {max_drop: 0.5, min_speedup: 1000}\n")
    res = run_cli("run", fail, "-o", tmp_path / "out")  # same folder: the export and steps are reused
    assert res.returncode == 3 and "min_speedup" in res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    gate = next(g for g in report["variants"][0]["gates"] if g["gate"] == "min_speedup")
    assert gate["passed"] is False and gate["limit"] == 1000


def test_quality_of_an_embedding_uses_cosine_not_top1():
    """An embedding's argmax agreement is meaningless: with the task known, agreement is the min
    cosine (the search read 0.89 'top-1 agreement' on MiniLM INT8 whose mean cosine is 0.993)."""
    from conftest import make_mlp

    from onnxopt.feeds import Dataset
    from onnxopt.gates import measure
    from onnxopt.evaluate import predict_all

    proto = make_mlp(0)
    ds = Dataset("x", {"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)})
    ref_out = predict_all(proto, ds)
    assert measure(ref_out, proto, ds, "m")["agreement_kind"] == "top-1 agreement"  # guessed from shape
    q = measure(ref_out, proto, ds, "m", classification=False)
    assert q["agreement_kind"] == "min cosine" and q["agreement"] == pytest.approx(1.0)
