import json

import numpy as np
import onnx
import pytest
from conftest import make_mlp

from onnxopt.artifact import io_signature, load_model, save_model, sidecar_path
from onnxopt.errors import BadInput, InternalError


def test_save_is_atomic_deterministic_and_has_sidecar(tmp_path):
    m = make_mlp(0)
    a, b = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    sa = save_model(m, a, {"source": {"name": "t"}, "steps": []})
    save_model(make_mlp(0), b, {"steps": [], "source": {"name": "t"}})
    assert a.read_bytes() == b.read_bytes()
    assert sidecar_path(a).read_bytes() == sidecar_path(b).read_bytes()
    side = json.loads(sidecar_path(a).read_text())
    import hashlib

    assert side["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest() == sa["sha256"]
    assert side["io"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    assert side["opset"] == {"ai.onnx": 17}
    assert sorted(p.name for p in a.parent.iterdir()) == ["m.onnx", "m.onnxopt.json"]  # no temp files


def test_failed_check_leaves_nothing(tmp_path):
    """save_model writes what onnxopt produced: a model the checker rejects there is onnxopt's bug
    (InternalError, exit 1), and nothing is left behind."""
    m = make_mlp(0)
    m.graph.node[0].input[1] = "does_not_exist"
    with pytest.raises(InternalError, match="onnx.checker"):
        save_model(m, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content,problem", [
    (None, "no such file"),
    (b"", "is empty"),
    (b"hello, this is a text file\n" * 10, "not an ONNX model"),
])
def test_load_rejects_non_models(tmp_path, content, problem):
    p = tmp_path / "m.onnx"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(BadInput) as e:
        load_model(p)
    assert problem in str(e.value) and str(p) in str(e.value)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_load_rejects_truncated_file(tmp_path, mlp_path):
    data = mlp_path.read_bytes()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
        p = tmp_path / f"cut{cut}.onnx"
        p.write_bytes(data[:cut])
        with pytest.raises(BadInput):
            load_model(p)


def test_io_signature_constant_weights_and_symbolic_dims():
    m = make_mlp(0, constant_weights=True, batch_dim="2*n")
    sig = io_signature(m)
    assert sig["inputs"][0]["shape"] == ["2*n", 16]
    assert [i["name"] for i in sig["inputs"]] == ["x"]
    assert np.dtype(sig["outputs"][0]["dtype"]) == np.float32
    assert isinstance(m, onnx.ModelProto)


def test_written_files_get_normal_permissions(tmp_path):
    import os

    p = tmp_path / "m.onnx"
    save_model(make_mlp(0), p)
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_lineage_carries_steps_over(tmp_path):
    from onnxopt.artifact import lineage

    bare = tmp_path / "bare.onnx"
    onnx.save(make_mlp(0), bare)
    assert lineage(bare, {"step": "x"}) == {"source": {"kind": "onnx", "name": str(bare)}, "steps": [{"step": "x"}]}
    made = tmp_path / "made.onnx"
    save_model(make_mlp(0), made, {"source": {"name": "digits-cnn"}, "task": "classification",
                                   "steps": [{"step": "export"}], "verification": {"passed": True}})
    meta = lineage(made, {"step": "quantize"})
    assert meta == {"source": {"name": "digits-cnn"}, "task": "classification",
                    "steps": [{"step": "export"}, {"step": "quantize"}]}  # old verification not carried
