"""INT4 weight-only quantization (``quantize --mode int4``, the ``quantize-int4`` pass): tiny
generated graphs with the traits of real files, the CLI's refusals, and the built-in MiniLM."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main
from onnxopt.errors import BadInput
from onnxopt.runner import Step, run_steps


def _encoder(opset: int = 17, constant_weights: bool = False, vocab: int = 300, dim: int = 64) -> onnx.ModelProto:
    """ids[batch, seq] -> Gather(table) -> MatMul(w1) -> Relu -> MatMul(w2) -> y[batch, seq, dim]:
    an embedding table and two 2-D MatMul weights, the shapes of a transformer's, at toy size.
    With ``constant_weights`` w1 is a Constant node (tf2onnx/paddle2onnx)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    w1 = (rng.standard_normal((dim, 128)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((128, dim)) / 11).astype(np.float32)
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")]
    if constant_weights:
        nodes.append(helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1c")))
    else:
        inits.append(numpy_helper.from_array(w1, "w1"))
    nodes += [helper.make_node("MatMul", ["e", "w1"], ["h"], name="mm1"),
              helper.make_node("Relu", ["h"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("ids", TensorProto.INT64, [-1, "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, "seq", dim])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _feeds(n: int = 4):
    rng = np.random.default_rng(1)
    return [{"ids": rng.integers(0, 300, (2, 16)).astype(np.int64)} for _ in range(n)]


def _cos(model: onnx.ModelProto, ref: onnx.ModelProto, feeds) -> float:
    a = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    r = np.concatenate([a.run(None, f)[0].reshape(-1) for f in feeds])
    o = np.concatenate([b.run(None, f)[0].reshape(-1) for f in feeds])
    return float(r @ o / np.linalg.norm(r) / np.linalg.norm(o))


def _ops(m: onnx.ModelProto) -> dict:
    out: dict = {}
    for n in m.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_int4_replaces_each_constant_weight_matmul(method):
    ref = _encoder(constant_weights=True)  # the front door lifts the Constant weight first
    feeds = _feeds()
    out, recs = run_steps(ref, [Step("quantize-int4", {"int4_method": method})],
                          calibration=feeds if method == "gptq" else None, where=None)
    ops = _ops(out)
    assert ops.get("MatMulNBits") == 2 and "MatMul" not in ops and ops.get("Gather") == 1
    assert recs[-1]["stats"]["int4"] == {"method": method, "block_size": 32, "matmuls": 2, "embeddings": 0}
    assert _cos(out, ref, feeds) > 0.99
    if method == "hqq":  # a level other than ORT's default reaches HQQ's nodes too
        out, _ = run_steps(ref, [Step("quantize-int4", {"int4_method": method, "accuracy_level": 4})], where=None)
        assert {a.i for n in out.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "accuracy_level"} == {4}


def test_int4_embedding_converts_an_old_opset_and_shrinks_the_table():
    ref = _encoder(opset=13)
    feeds = _feeds()
    out, recs = run_steps(ref, [Step("quantize-int4", {"int4_embedding": True})], where=None)
    assert _ops(out).get("GatherBlockQuantized") == 1 and "Gather" not in _ops(out)
    assert any("opset 13 -> 21" in d for d in recs[0]["normalize"]["did"])
    assert out.ir_version >= 10
    onnx.checker.check_model(out)
    assert len(out.SerializeToString()) < 0.3 * len(ref.SerializeToString())
    assert _cos(out, ref, feeds) > 0.98
    plain, _ = run_steps(ref, [Step("quantize-int4")], where=None)
    assert len(out.SerializeToString()) < len(plain.SerializeToString())


def test_int4_settings_are_checked():
    from onnxopt.passes import QuantizeInt4

    with pytest.raises(BadInput, match="power of 2"):
        QuantizeInt4(block_size=48)
    with pytest.raises(BadInput, match="GPTQ needs calibration data"):
        QuantizeInt4(int4_method="gptq")
    with pytest.raises(BadInput, match="MatMul weights only"):
        QuantizeInt4(int4_method="hqq", int4_embedding=True)


def _cli(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    err = res.stderr if hasattr(res, "stderr") else res.output
    return res.exit_code, [ln for ln in err.splitlines() if ln.startswith("error:")], err


def test_quantize_mode_int4_on_the_cli(tmp_path):
    src = tmp_path / "enc.onnx"
    onnx.save(_encoder(), src)
    out = tmp_path / "enc-int4.onnx"
    code, lines, err = _cli(["quantize", src, "-o", out, "--mode", "int4", "--int4-embedding", "--json"])
    assert code == 0, err
    side = json.loads((tmp_path / "enc-int4.onnxopt.json").read_text())
    assert side["quantize"]["chosen"] == "int4"
    assert side["steps"][-1]["passes"][-1]["stats"]["int4"]["embeddings"] == 1
    assert "speed_check" not in side  # asked for by name, for size
    assert out.stat().st_size < 0.3 * src.stat().st_size
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("args, says", [
    (["--block-size", "64"], "--block-size: is a setting of --mode int4, not of --mode auto"),
    (["--mode", "int4", "--method", "entropy"], "--method: is a setting of the INT8 quantizers"),
    (["--mode", "int4", "--block-size", "48"], "48 is not a power of 2"),
    (["--mode", "int4", "--int4-method", "gptq", "--int4-embedding"], "MatMul weights only"),
])
def test_int4_option_mistakes_are_one_line(tmp_path, args, says):
    src = tmp_path / "enc.onnx"
    onnx.save(_encoder(), src)
    code, lines, err = _cli(["quantize", src, "-o", tmp_path / "o.onnx", *args])
    assert code == 2 and len(lines) == 1 and says in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_int4_on_a_model_without_matmul_weights_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "relu.onnx"
    onnx.save(m, src)
    code, lines, err = _cli(["quantize", src, "-o", tmp_path / "o.onnx", "--mode", "int4"])
    assert code == 2 and len(lines) == 1 and "no MatMul with a constant 2-D weight" in lines[0], err


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import onnxopt

    p = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    onnxopt.export("minilm", p)
    return p


def test_minilm_default_int8_and_int4(minilm, tmp_path):
    """The README's first transformer example writes its model (it was refused for "15.6% of the
    class decisions" of the sentence embedding), and INT4 with the embedding table is ~6x smaller."""
    code, _, err = _cli(["quantize", minilm, "-o", tmp_path / "int8.onnx"])
    assert code == 0, err
    code, _, err = _cli(["quantize", minilm, "-o", tmp_path / "int4.onnx", "--mode", "int4", "--int4-embedding",
                         "--min-cosine", "0.9", "--max-channel-error", "1"])
    assert code == 0, err
    assert (tmp_path / "int4.onnx").stat().st_size < 0.2 * minilm.stat().st_size
    side = json.loads((tmp_path / "int4.onnxopt.json").read_text())
    real = side["verification"]["cases"][-1]
    assert real["cosine_mean"] > 0.9 and "decisions_changed" not in real
