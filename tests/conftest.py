"""Tiny generated ONNX graphs with the traits real exporters produce."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests/factories.py is importable as `factories`
os.environ.setdefault("ONNXOPT_NO_PROGRESS", "1")


def make_mlp(seed: int = 0, opset: int = 17, hidden: int = 10, constant_weights: bool = False,
             batch_dim="batch") -> onnx.ModelProto:
    """x[batch,16] -> MatMul -> Add -> Relu -> MatMul -> y[batch,4]. With ``constant_weights``
    the first weight is a Constant node (as tf2onnx/paddle2onnx write it)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, 4)).astype(np.float32)
    nodes = []
    inits = [numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    if constant_weights:
        nodes.append(helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1c")))
    else:
        inits.append(numpy_helper.from_array(w1, "w1"))
    nodes += [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_embedding(vocab: int = 50, dim: int = 8, opset: int = 13) -> onnx.ModelProto:
    """ids[batch, seq] int64 -> Gather(table) -> ReduceMean over seq -> y[batch, dim];
    the sequence dim is written as an expression, as some exporters do."""
    table = np.random.default_rng(1).standard_normal((vocab, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed"),
        helper.make_node("ReduceMean", ["e"], ["y"], axes=[1], keepdims=0, name="pool"),
    ]
    graph = helper.make_graph(
        nodes, "emb",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq + 1"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def mlp_path(tmp_path) -> Path:
    p = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(0), p)
    return p


@pytest.fixture
def mlp2_path(tmp_path) -> Path:
    p = tmp_path / "mlp_wide.onnx"
    onnx.save(make_mlp(0, hidden=64), p)
    return p


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory) -> Path:
    """digits-cnn exported once (with its sidecar) for the jobs that take it as a read-only input."""
    pytest.importorskip("torch")
    import onnxopt

    p = tmp_path_factory.mktemp("digits") / "digits.onnx"
    onnxopt.export("digits-cnn", p)
    return p


@pytest.fixture(autouse=True)
def _untimed_speed_check(monkeypatch):
    """Unit tests never time: in-process, the jobs' speed check (quantize: on by default for a
    model that is not a built-in family; prune: for channel pruning) reads a fixed 1.0x, so a tiny
    test graph is not refused or accepted by the noise of a 10-microsecond timing. Tests of the
    check itself patch it again; CLI tests in a subprocess pass --no-speed-check, and
    tests/realworld times for real."""
    jobs = importlib.import_module("onnxopt.jobs")

    def untimed(reference, candidate, feeds, **kw):
        return {"reference_p50_ms": 1.0, "candidate_p50_ms": 1.0, "speedup": 1.0, "seconds": 0.0,
                "provider": "cpu", "untimed": True}

    monkeypatch.setattr(jobs, "speed_ratio", untimed)
