"""The one runner, the one gate, options declared once, and exit codes that never lie.

* A new pass is one file plus one registry line, and then works from the CLI (``onnxopt apply``),
  a recipe and the search -- shown with a toy pass written here as that one file.
* ``quantize --max-drop`` and a recipe with the same gate give the same verdict and numbers.
* Exit codes: 2 only for what the user gave, 3 only for a gate or verification a correct program
  can fail, 1 (with the traceback) for anything onnxopt's own code or output got wrong.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import make_mlp
from onnxopt.artifact import read_sidecar
from onnxopt.cli import main
from onnxopt.errors import BadInput, GateFailed, InternalError, OnnxoptError
from onnxopt.passes import PASSES

TOY = textwrap.dedent('''
    """A toy pass: renames the graph (a stand-in for any new pass)."""
    import dataclasses

    import onnx_ir as ir

    from onnxopt.options import option
    from onnxopt.passes._common import OnnxoptPass, PassResult


    @dataclasses.dataclass(frozen=True)
    class RenameGraph(OnnxoptPass):
        """Give the graph a new name."""

        label: str = option("toy", "The new graph name.", search=("toy", "toy2"))
        break_output: bool = option(False, "Write a model ONNX Runtime cannot run (to test exit codes).")
        break_promise: bool = option(False, "Fail the pass's own postcondition (to test exit codes).")

        def call(self, model: ir.Model) -> PassResult:
            new = model.clone()
            new.graph.name = self.label
            if self.break_output:
                node = next(iter(new.graph))
                node.op_type, node.domain = "NoSuchOp", "com.example.toy"
                new.opset_imports["com.example.toy"] = 1
            return PassResult(new, modified=True, stats={"nodes_before": len(model.graph),
                                                          "nodes_after": len(new.graph)})

        def ensures(self, model: ir.Model) -> None:
            if self.break_promise:
                raise AssertionError("the graph lost its name")
''')


@pytest.fixture
def toy_pass(tmp_path, monkeypatch):
    """The toy pass as its own file, registered with one line."""
    path = tmp_path / "toy_pass.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_pass", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_pass", mod)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(PASSES, "rename-graph", mod.RenameGraph)  # the one registry line
    return mod.RenameGraph


def _mlp_with_data(tmp_path) -> tuple[Path, Path]:
    src = tmp_path / "m.onnx"
    onnx.save(make_mlp(0), src)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, labels=rng.integers(0, 4, 40))
    return src, data


def _invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, (SystemExit, OnnxoptError)):
        import traceback

        traceback.print_exception(res.exception)  # shown when a test fails
    return res


# ---- a new pass: one file + one registry line ---------------------------------------------------

def test_toy_pass_works_from_the_cli(toy_pass, tmp_path):
    src, data = _mlp_with_data(tmp_path)
    out = tmp_path / "renamed.onnx"
    res = _invoke("apply", "rename-graph", src, "-o", out, "--label", "hello", "--data", data, "--min-cosine", "0.99")
    assert res.exit_code == 0, res.output
    assert onnx.load(out).graph.name == "hello"
    side = read_sidecar(out)
    step = side["steps"][-1]
    assert step["step"] == "rename-graph" and step["settings"]["label"] == "hello"
    assert {"seconds", "bytes_before", "bytes_after", "cache_key", "nodes_before"} <= set(step)
    assert side["gates"][0]["gate"] == "min_cosine" and side["gates"][0]["passed"]
    # the help text is the field's
    help_text = _invoke("apply", "rename-graph", "--help").output
    assert "The new graph name." in help_text and "--break-output" in help_text


def test_toy_pass_works_in_a_recipe(toy_pass, tmp_path):
    from onnxopt.recipe import run_recipe

    src, data = _mlp_with_data(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {src}\ndata: {data}\ntarget: {{duration: 0.2}}\n"
                      "steps:\n  - pass: rename-graph\n    label: from-recipe\ngates: {min_cosine: 0.99}\n")
    report = run_recipe(recipe, tmp_path / "out")
    assert report["chosen"] == "recipe"
    assert onnx.load(report["best"]).graph.name == "from-recipe"
    recipe.write_text(f"model: {src}\nsteps:\n  - pass: rename-graph\n    lable: x\n")
    with pytest.raises(BadInput, match="did you mean 'label'"):
        run_recipe(recipe, tmp_path / "out2")


def test_toy_pass_is_offered_to_the_search(toy_pass, tmp_path):
    from onnxopt.search import search, search_space

    src, data = _mlp_with_data(tmp_path)
    names = [c["name"] for c in search_space(onnx.load(src), has_calibration=True)]
    assert "rename-graph label=toy" in names and "rename-graph label=toy2" in names  # its field's search values
    from onnxopt.bench import BenchSettings

    report = search(src, tmp_path / "s", data=str(data), settings=BenchSettings(batches=(1,), duration=0.2,
                                                                                 memory=False))
    toy = [v for v in report["variants"] if v["name"].startswith("rename-graph")]
    assert len(toy) == 2 and all(v["status"] == "ok" and v["agreement"] == 1.0 for v in toy)


# ---- one gate: the same verdict and numbers from every command ----------------------------------

@pytest.mark.slow
def test_quantize_and_a_recipe_judge_the_same_file_alike(digits_onnx, tmp_path):
    from onnxopt import quantize
    from onnxopt.recipe import run_recipe

    def recipe(name, gates):
        r = tmp_path / f"{name}.yaml"
        r.write_text(f"model: {digits_onnx}\ndata: digits\ntarget: {{duration: 0.2}}\nsteps:\n"
                     "  - quant-preprocess\n  - pass: quantize-static\n    preprocess: false\n"
                     f"gates: {json.dumps(gates)}\n")
        try:
            return run_recipe(r, tmp_path / name)["variants"][0]["gates"]
        except GateFailed as e:
            return e.report["variants"][0]["gates"]

    def job(name, **gates):
        try:
            return quantize(digits_onnx, tmp_path / f"{name}.onnx", data="digits", fallback=False, **gates)
        except GateFailed as e:
            return e.report

    # A gate that holds: same verdict, same numbers (accuracy drop on the whole 450-image test split).
    side = job("loose", max_drop=0.5, min_agreement=0.9)
    assert side["verification"]["accuracy"]["samples"] == 450
    assert side["gates"] == recipe("loose", {"max_drop": 0.5, "min_agreement": 0.9})
    assert all(g["passed"] for g in side["gates"]) and side["gate"]["passed"]
    # A gate that fails (INT8 is not bit-exact): same verdict, same numbers, exit 3 both ways.
    side = job("tight", min_cosine=1.0, max_drop=0.5)
    tight = recipe("tight", {"min_cosine": 1.0, "max_drop": 0.5})
    assert side["gates"] == tight and not all(g["passed"] for g in tight)


# ---- exit codes that never lie ------------------------------------------------------------------

def test_exit_2_for_what_the_user_gave(tmp_path):
    src, data = _mlp_with_data(tmp_path)
    from onnxopt import prune

    with pytest.raises(BadInput, match="did you mean 'amount'") as e:  # was a TypeError on the ONNX route
        prune(src, tmp_path / "p.onnx", amout=0.5)
    assert e.value.exit_code == 2
    res = _invoke("apply", "prune-masks", src, "-o", tmp_path / "x.onnx", "--amount", "2")
    assert res.exit_code == 2 and not (tmp_path / "x.onnx").exists()
    res = _invoke("apply", "no-such-pass", src, "-o", tmp_path / "x.onnx")
    assert res.exit_code == 2  # click: no such command
    # A failed precondition is the input's fault: quantizing an already quantized model.
    q = tmp_path / "q.onnx"
    res = _invoke("quantize", src, "-o", q, "--data", data)
    assert res.exit_code == 0, res.output
    res = _invoke("apply", "quantize-dynamic", q, "-o", tmp_path / "qq.onnx")
    assert res.exit_code == 2 and "already quantized" in res.output


def test_exit_3_for_a_gate_a_correct_program_can_fail(toy_pass, tmp_path):
    src, data = _mlp_with_data(tmp_path)
    out = tmp_path / "big.onnx"
    res = _invoke("apply", "rename-graph", src, "-o", out, "--max-size-mb", "0.000001")
    assert res.exit_code == 3 and "max_size_mb" in res.output
    # the variant and its sidecar are written under a name no pipeline takes for the result
    assert not out.exists() and (tmp_path / "big.rejected.onnx").exists()
    assert "big.rejected.onnx" in res.output
    with pytest.raises(GateFailed) as e:
        from onnxopt import apply

        apply("rename-graph", src, tmp_path / "big2.onnx", max_size_mb=0.000001)
    assert e.value.report["gates"][0]["passed"] is False  # the report is a field of the error


def test_exit_1_when_onnxruntime_fails_on_a_file_onnxopt_wrote(toy_pass, tmp_path):
    src, _ = _mlp_with_data(tmp_path)
    out = tmp_path / "broken.onnx"
    res = _invoke("apply", "rename-graph", src, "-o", out, "--break-output")
    assert res.exit_code == 1
    assert isinstance(res.exception, InternalError) and "onnxopt produced" in str(res.exception)
    assert not out.exists()  # nothing half-written


def test_exit_1_when_a_pass_breaks_its_own_postcondition(toy_pass, tmp_path):
    src, _ = _mlp_with_data(tmp_path)
    res = _invoke("apply", "rename-graph", src, "-o", tmp_path / "x.onnx", "--break-promise")
    assert res.exit_code == 1 and isinstance(res.exception, InternalError)
    assert "postcondition" in str(res.exception)


def test_exit_1_traceback_from_the_real_entry_point(tmp_path):
    """The console script shows the traceback of an InternalError (a bug to report), exit 1."""
    import subprocess

    script = tmp_path / "boom.py"
    script.write_text("from onnxopt.errors import InternalError\n"
                      "import onnxopt.cli as c\n"
                      "@c.main.command('boom')\n"
                      "def boom():\n"
                      "    raise InternalError('x.onnx', 'onnxopt wrote a broken file')\n"
                      "c.main()\n")
    res = subprocess.run([sys.executable, str(script), "boom"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" in res.stderr and "onnxopt wrote a broken file" in res.stderr


def test_error_classes_map_to_their_codes():
    assert BadInput("f", "p").exit_code == 2
    assert GateFailed("f", "p").exit_code == 3
    assert InternalError("f", "p").exit_code == 1
    assert OnnxoptError("f", "p", report={"a": 1}).report == {"a": 1}


def test_search_space_of_a_big_transformer_leaves_the_fusions_out(monkeypatch):
    """ORT's transformer fusion optimizer ran out of memory on big-encoder (22 GB): from
    FUSE_UP_TO_BYTES of weights the search offers unfused INT8 and INT4, no fused candidate."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxopt.passes import _common
    from onnxopt.search import search_space

    rng = np.random.default_rng(0)
    g = helper.make_graph(  # int64 ids -> Gather -> MatMul -> Softmax: a text model to looks_like_transformer
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
         helper.make_node("MatMul", ["e", "w"], ["m"], name="mm"), helper.make_node("Softmax", ["m"], ["y"], name="sm")],
        "tiny_text", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])],
        [numpy_helper.from_array(rng.standard_normal((30, 8)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    names = [c["name"] for c in search_space(model, has_calibration=False)]
    assert "fused" in names and "fused + dynamic INT8" in names
    monkeypatch.setattr(_common, "FUSE_UP_TO_BYTES", 1)
    big = search_space(model, has_calibration=False)
    assert [c["name"] for c in big][:3] == ["dynamic INT8", "INT4 weights", "INT4 weights + embedding"]
    assert not any(s.name == "simplify" and s.settings.get("transformer") for c in big for s in c["steps"])
