"""Models whose weights live in external data: written atomically and deterministically, their
locations confined to the model's folder, and the CLI path export -> quantize -> bench -> pack ->
verify-bundle on a model forced to external data (the same path a >2 GiB model takes)."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import artifact
from onnxopt.artifact import load_model, model_digest, model_size, save_model, write_model
from onnxopt.errors import BadInput
from onnxopt.runtime import make_session
from test_cli import _assert_clean_error, run_cli


def _model(opset: int = 13) -> onnx.ModelProto:
    """x [N, 64] -> MatMul(W1) -> Relu -> If(flag: MatMul(W2) | Identity): big weights as
    initializers, a small bias inline, a weight as a Constant node inside a branch."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1")
    b = numpy_helper.from_array(np.full(64, 0.1, np.float32), "b")  # 256 bytes: stays inline
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [64, 64], rng.standard_normal(64 * 64).astype(np.float32).tolist())
    then = helper.make_graph([helper.make_node("Constant", [], ["w3"], value=numpy_helper.from_array(
        rng.standard_normal((64, 64)).astype(np.float32), "w3v")), helper.make_node("MatMul", ["h", "w3"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("MatMul", ["h", "w2"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
                                       helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], [w1, b, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


FEEDS = {"x": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32), "flag": np.array(False)}


def test_external_write_is_atomic_deterministic_and_complete(tmp_path):
    m = _model()
    a = save_model(m, tmp_path / "a" / "m.onnx", {"k": 1}, external=True)
    b = save_model(m, tmp_path / "b" / "m.onnx", {"k": 1}, external=True)
    for folder, side in (("a", a), ("b", b)):
        files = sorted(p.name for p in (tmp_path / folder).iterdir())
        assert files == ["m.onnx", "m.onnx.data", "m.onnxopt.json"]  # no temp file left
        assert side["external_data"][0]["location"] == "m.onnx.data"
        assert side["sha256"] == artifact.sha256_bytes((tmp_path / folder / "m.onnx").read_bytes())
        data = (tmp_path / folder / "m.onnx.data").read_bytes()
        assert side["external_data"][0]["sha256"] == artifact.sha256_bytes(data)
        assert side["external_data"][0]["bytes"] == len(data)
        assert json.loads((tmp_path / folder / "m.onnxopt.json").read_text())["external_data"] == side["external_data"]
    assert (tmp_path / "a/m.onnx.data").read_bytes() == (tmp_path / "b/m.onnx.data").read_bytes()
    assert (tmp_path / "a/m.onnx").read_bytes() == (tmp_path / "b/m.onnx").read_bytes()
    header = onnx.load(str(tmp_path / "a/m.onnx"), load_external_data=False)
    kinds = {t.name: t.data_location for t in header.graph.initializer}
    assert kinds == {"w1": TensorProto.EXTERNAL, "b": TensorProto.DEFAULT, "w2": TensorProto.EXTERNAL}
    offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in header.graph.initializer
               if t.data_location == TensorProto.EXTERNAL]
    assert all(o % 4096 == 0 for o in offsets)  # page-aligned: ORT can map them
    # the caller's model is untouched and reads back the same weights (w2 as raw bytes now)
    back = load_model(tmp_path / "a/m.onnx")
    assert model_digest(back) == model_digest(load_model(tmp_path / "b/m.onnx"))
    for t, u in zip(m.graph.initializer, back.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))
    assert m.graph.initializer[2].float_data and not m.graph.initializer[2].HasField("data_location")
    assert model_size(m) == m.ByteSize()
    ref = make_session(m).run(None, FEEDS)[0]
    np.testing.assert_array_equal(make_session(str(tmp_path / "a/m.onnx")).run(None, FEEDS)[0], ref)


def test_an_interrupted_external_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = artifact._raw

    def dying(t):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(t)

    monkeypatch.setattr(artifact, "_raw", dying)
    with pytest.raises(KeyboardInterrupt):
        write_model(_model(), tmp_path / "m.onnx", external=True)
    assert list(tmp_path.iterdir()) == []


def test_external_data_is_chosen_by_size_and_forced_by_the_context(tmp_path, monkeypatch):
    m = _model()
    assert "external_data" not in write_model(m, tmp_path / "small.onnx")
    with artifact.external_data():
        assert "external_data" in write_model(m, tmp_path / "forced.onnx")
    assert "external_data" not in write_model(m, tmp_path / "after.onnx")  # the scope ended
    write_model(m, tmp_path / "forced.onnx")  # written inline again: its old .data file goes
    assert not (tmp_path / "forced.onnx.data").exists()
    monkeypatch.setattr(artifact, "EXTERNAL_AUTO_BYTES", 10_000)
    assert "external_data" in write_model(m, tmp_path / "big.onnx")


def _with_location(tmp_path, location: str):
    folder = tmp_path / "model"
    save_model(_model(), folder / "m.onnx", external=True)
    header = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for t in header.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (folder / "m.onnx").write_bytes(header.SerializeToString())
    return folder / "m.onnx"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_location_outside_the_folder_is_refused_and_never_read(tmp_path, how):
    outside = tmp_path / "outside.data"
    os.mkfifo(outside)  # opening it to read would block: a read outside the folder hangs the command
    location = {"dotdot": "../outside.data", "absolute": str(outside), "symlink": "link.data"}[how]
    path = _with_location(tmp_path, location)
    if how == "symlink":
        (path.parent / "link.data").symlink_to(outside)
    with pytest.raises(BadInput, match="outside the model's folder"):
        load_model(path)
    for cmd in (["inspect", path], ["quantize", path, "-o", tmp_path / "q.onnx"], ["bench", path, "--duration", "0.1"],
                ["pack", path, "-o", tmp_path / "b.tar.gz"]):
        res = run_cli(*cmd)  # a read of the FIFO would hang: run_cli's timeout fails the test
        _assert_clean_error(res, tmp_path / "q.onnx", "outside the model's folder")


def test_a_missing_data_file_is_one_line(tmp_path):
    path = _with_location(tmp_path, "m.onnx.data")
    (path.parent / "m.onnx.data").unlink()
    res = run_cli("quantize", path, "-o", tmp_path / "q.onnx")
    _assert_clean_error(res, tmp_path / "q.onnx", "external data file 'm.onnx.data' is missing")


@pytest.mark.slow
def test_minilm_forced_to_external_data_end_to_end(tmp_path):
    """The >2 GiB path on a 90 MB model: every step reads and writes external data."""
    res = run_cli("export", "minilm", "-o", "fp32/m.onnx", "--external-data", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "fp32/m.onnx.data").stat().st_size > 80e6
    assert (tmp_path / "fp32/m.onnx").stat().st_size < 1e6
    res = run_cli("quantize", "fp32/m.onnx", "-o", "int8/m.onnx", "--external-data", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    side = json.loads((tmp_path / "int8/m.onnxopt.json").read_text())
    assert side["external_data"][0]["sha256"] == artifact.sha256_bytes((tmp_path / "int8/m.onnx.data").read_bytes())
    res = run_cli("bench", "fp32/m.onnx", "int8/m.onnx", "--duration", "0.3", "--no-memory", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["rows"]
    fp32 = next(r for r in rows if r["model"].startswith("fp32"))
    assert fp32["size_bytes"] > 80e6  # the .data file counted
    res = run_cli("pack", "fp32/m.onnx", "-o", "b.tar.gz", "--external-data", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with tarfile.open(tmp_path / "b.tar.gz") as tf:
        names = tf.getnames()
        manifest = json.load(tf.extractfile("manifest.json"))
        tf.extractall(tmp_path / "unpacked", filter="data")
    assert "model.onnx.data" in names and manifest["model"]["external_data"] == "model.onnx.data"
    assert manifest["files"]["model.onnx.data"]["bytes"] > 80e6
    res = run_cli("verify-bundle", "b.tar.gz", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # a changed weight is caught by its hash
    data = tmp_path / "unpacked/model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[5000] ^= 0xFF
    data.write_bytes(bytes(raw))
    res = run_cli("verify-bundle", tmp_path / "unpacked")
    assert res.returncode == 3 and "model.onnx.data: changed" in res.stderr
    shutil.rmtree(tmp_path / "unpacked")


# ---- bounded memory: ORT's quantizers on a lazy input -------------------------------------------

def _mlp_with_an_untouched_big_bias(opset: int = 17) -> onnx.ModelProto:
    """x [N, 300] -> MatMul -> Add(bias of 1.2 KB: external, never quantized) -> Relu -> MatMul,
    with a node whose name ORT's shape inference must keep, and an output declared [N, ?]."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((300, 300)).astype(np.float32) * 0.05, "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(300).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((300, 16)).astype(np.float32) * 0.05, "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"), helper.make_node("Add", ["m", "b1"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["h"], name="relu"), helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 300])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "d"])], [w1, b1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("step", ["quantize-dynamic", "quantize-int4"])
def test_ort_quantizers_on_a_lazy_input_write_the_same_model(step, monkeypatch):
    """The big-model path (weights streamed to a temp .data, read by the quantizer one at a time,
    shapes inferred in place instead of ORT's deep copy and reload) gives the same model, byte for
    byte, as ORT's own path on a model loaded whole; the bias it does not quantize comes back from
    the input's .data file."""
    from onnxopt.passes import _ort
    from onnxopt.runner import run_steps

    proto = _mlp_with_an_untouched_big_bias()
    eager, _ = run_steps(proto, [step])
    calls = []
    real = _ort.lazy_input

    def counting(src):
        calls.append(src)
        return real(src)

    monkeypatch.setattr(_ort, "lazy_input", counting)
    from onnxopt.passes import quantize as qmod

    monkeypatch.setattr(qmod, "lazy_input", counting)
    with artifact.external_data():
        lazy, _ = run_steps(proto, [step])
    assert calls, "the lazy path was not taken"
    assert model_digest(lazy) == model_digest(eager)
    assert any(t.name == "b1" and len(t.raw_data) == 1200 for t in lazy.graph.initializer)
    x = np.random.default_rng(0).standard_normal((3, 300)).astype(np.float32)
    np.testing.assert_array_equal(make_session(lazy).run(None, {"x": x})[0], make_session(eager).run(None, {"x": x})[0])


def test_shapes_in_place_matches_ort_reload_without_copying_the_weights():
    from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer

    from onnxopt.passes._ort import shapes_in_place

    proto = _mlp_with_an_untouched_big_bias()
    ref = save_and_reload_model_with_shape_infer(proto)
    mine = onnx.ModelProto()
    mine.CopyFrom(proto)
    out = shapes_in_place(mine)
    assert out is mine  # updated in place: no second model
    assert [t.SerializeToString() for t in out.graph.initializer] == \
        [t.SerializeToString() for t in proto.graph.initializer]  # the weights untouched
    for field in ("input", "output", "value_info"):
        assert [v.SerializeToString() for v in getattr(out.graph, field)] == \
            [v.SerializeToString() for v in getattr(ref.graph, field)], field
    assert {p.key: p.value for p in out.metadata_props} == {p.key: p.value for p in ref.metadata_props}


def test_normalize_gives_back_the_same_model_when_nothing_changes():
    from onnxopt.normalize import normalize

    proto = _mlp_with_an_untouched_big_bias()
    out, rec = normalize(proto, sample={"x": np.ones((2, 300), np.float32)})
    assert out is proto and rec["did"] == []  # no second copy of the weights
    proto.graph.node[0].name = ""
    out, rec = normalize(proto, sample={"x": np.ones((2, 300), np.float32)})
    assert out is not proto and any("named" in d for d in rec["did"])
    assert [t.SerializeToString() for t in out.graph.initializer] == \
        [t.SerializeToString() for t in proto.graph.initializer]  # the weights filled back in whole


@pytest.mark.parametrize("external", [True, False])
def test_quantize_verifies_against_the_file_and_holds_one_session_at_a_time(tmp_path, monkeypatch, external):
    """On an input with external data the job drops its copy once quantized: the verification's
    reference is the file itself (ORT maps its weights). Sessions of the reference and of the
    variant are never alive together."""
    import importlib
    import weakref

    from onnxopt import jobs

    qjob = importlib.import_module("onnxopt.quantize")  # the package's name is the function

    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    write_model(_mlp_with_an_untouched_big_bias(), src, external=external)
    assert (tmp_path / "in" / "m.onnx.data").exists() == external
    seen, alive, most = [], weakref.WeakSet(), [0]
    real_verify, real_session = jobs.verify_variant, jobs.make_session

    def verify(ref, *a, **k):
        seen.append(ref)
        return real_verify(ref, *a, **k)

    class Held:  # a session that weakref can follow
        def __init__(self, s):
            self.s = s

        def __getattr__(self, name):
            return getattr(self.s, name)

    def session(*a, **k):
        h = Held(real_session(*a, **k))
        alive.add(h)
        most[0] = max(most[0], len(alive))
        return h

    monkeypatch.setattr(qjob, "verify_variant", verify)
    monkeypatch.setattr(jobs, "make_session", session)
    monkeypatch.setattr(jobs, "run", lambda s, feeds, *a, **k: s.s.run(None, feeds))
    qjob.quantize(src, tmp_path / "q.onnx", mode="dynamic", speed_check=False, max_channel_error=100,
                  data=str(_feeds_npz(tmp_path)))
    assert isinstance(seen[0], str) == external and (seen[0] == str(src) if external else True)
    assert most[0] == 1


def _feeds_npz(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, x=np.random.default_rng(0).standard_normal((16, 300)).astype(np.float32))
    return p
