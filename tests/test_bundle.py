"""Edge bundles: round trip, determinism, tamper detection, safe unpacking, preprocessing, CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import make_mlp
from onnx import TensorProto, helper, numpy_helper

from onnxopt import bundle
from onnxopt._cli_bundle import pack as cli_pack
from onnxopt._cli_bundle import verify_bundle as cli_verify
from onnxopt.artifact import save_model
from onnxopt.errors import BadInput, VerificationFailed

LABELS4 = ["zero", "one", "two", "three"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def packed(tmp_path):
    """An MLP (x[batch,16] -> y[batch,4]) packed with four labels."""
    model = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(0), model)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS4) + "\n")
    out = tmp_path / "mlp.tar.gz"
    manifest = bundle.pack(model, out, labels=labels)
    return model, out, manifest


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def _write_tar(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _ort_outputs(model_path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


# ---------------------------------------------------------------------------------------------
# round trip and determinism


def test_round_trip_pack_verify_load_predict(packed, tmp_path):
    model, out, manifest = packed
    files = _members(out)
    assert sorted(files) == ["README.md", "labels.txt", "manifest.json", "model.onnx", "model.ort",
                             "required_operators.config", "smoke.npz"]
    on_disk = json.loads(files["manifest.json"])
    assert on_disk == json.loads(json.dumps(manifest))  # the returned manifest is what was written
    for name, spec in on_disk["files"].items():  # every other file is hashed, and right
        assert hashlib.sha256(files[name]).hexdigest() == spec["sha256"] and len(files[name]) == spec["bytes"]
    assert "manifest.json" not in on_disk["files"]
    assert files["model.onnx"] == model.read_bytes()  # the chosen model, byte for byte
    assert on_disk["io"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    assert on_disk["io"]["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}]
    assert on_disk["labels"] == {"file": "labels.txt", "count": 4, "output": "y"}
    assert on_disk["model"]["ort"] == "model.ort" and on_disk["model"]["ort_conversion"]["ok"]
    assert set(on_disk["versions"]) == {"onnxopt", "onnx", "onnxruntime"}
    config = files["required_operators.config"].decode()
    assert "MatMul" in config and "/tmp" not in config and str(tmp_path) not in config
    readme = files["README.md"].decode()
    assert "verify-bundle" in readme and "`x`" in readme and "--include_ops_by_config" in readme

    # The stored smoke outputs are what ONNX Runtime gives for the stored inputs.
    with np.load(io.BytesIO(files["smoke.npz"])) as z:
        np.testing.assert_array_equal(z["output_0"], _ort_outputs(model, z["input_0"]))

    report = bundle.verify_bundle(out)
    assert report["passed"] and [m["file"] for m in report["models"]] == ["model.onnx", "model.ort"]
    assert all(m["status"] == "ok" for m in report["models"])
    assert all(f["status"] == "ok" for f in report["files"])

    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    ref = _ort_outputs(model, x)
    b = bundle.load(out)
    assert b.model_file == "model.onnx" and b.labels == LABELS4 and b.root is None
    res = b.predict(x)
    np.testing.assert_allclose(res["outputs"]["y"], ref, rtol=1e-6, atol=1e-6)
    assert list(res["top1"]) == list(ref.argmax(1))
    assert res["labels"] == [LABELS4[i] for i in ref.argmax(1)]
    assert b.predict(x[0])["outputs"]["y"].shape == (1, 4)  # a missing batch axis is added
    b_ort = bundle.load(out, prefer="ort")
    assert b_ort.model_file == "model.ort"
    np.testing.assert_allclose(b_ort.predict({"x": x})["outputs"]["y"], ref, rtol=1e-4, atol=1e-4)


def _cnn() -> onnx.ModelProto:
    """A small CNN with two outputs (float probabilities, int64 class): several op types, so
    onnxruntime's ORT-format kernel table (written in hash-map order) has entries to shuffle."""
    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sigmoid", ["p1"], ["s1"]),
             helper.make_node("Mul", ["p1", "s1"], ["m1"]),
             helper.make_node("GlobalAveragePool", ["m1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
             helper.make_node("ArgMax", ["logits"], ["cls"], axis=1, keepdims=0)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", 5]),
         helper.make_tensor_value_info("cls", TensorProto.INT64, ["n"])],
        [init("w1", (8, 3, 3, 3)), init("b1", (8,)), init("w2", (5, 8)), init("b2", (5,))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_packing_twice_gives_identical_bytes(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), model)
    labels = ["a", "b", "c", "d", "e"]
    a, b, c = tmp_path / "a.tar.gz", tmp_path / "b" / "b.tar.gz", tmp_path / "c.tar.gz"
    m = bundle.pack(model, a, labels=labels, preprocess="unit")
    assert m["model"]["ort_conversion"]["reproducible"] is True and m["warnings"] == []
    bundle.pack(model, b, labels=labels, preprocess="unit")
    # Another process too: onnxruntime's own ORT-format output changes between runs.
    code = ("import sys; from onnxopt.bundle import pack; "
            "pack(sys.argv[1], sys.argv[2], labels=['a', 'b', 'c', 'd', 'e'], preprocess='unit')")
    subprocess.run([sys.executable, "-c", code, str(model), str(c)], check=True, cwd=ROOT, timeout=120)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    raw = a.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip header without a timestamp
    with tarfile.open(a, "r:gz") as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == {
        (bundle._TAR_MTIME, 0, 0, "", "", 0o644, tarfile.REGTYPE)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "b", "c.tar.gz", "cnn.onnx"]  # no temp files
    report = bundle.verify_bundle(a)  # the reproducible ORT file loads and matches, int64 output included
    assert report["passed"] and report["models"][1]["file"] == "model.ort"
    assert [o["output"] for o in report["models"][1]["outputs"]] == ["prob", "cls"]


def test_ort_file_is_canonical_whatever_order_onnxruntime_wrote(tmp_path):
    """onnxruntime writes the kernel-type table of an ORT-format file in hash-map order; the
    bundle's copy has it sorted, the model part byte for byte, and still loads and runs."""
    import onnxruntime as ort

    model = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), model)
    converted, info = bundle._convert_to_ort(model.read_bytes())
    raw, canonical, config = converted
    assert canonical is not None and "not_reproducible_why" not in info
    assert bundle._canonical_ort(canonical) == canonical
    assert bundle._canonical_ort(_reversed_kernel_table(raw)) == canonical
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(canonical, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1], ref[1])
    assert b"Conv" in config and b"ArgMax" in config


def _reversed_kernel_table(buf: bytes) -> bytes:
    """The same ORT-format file with its kernel-type table in reverse order (as another run of
    onnxruntime might write it), rebuilt with the FlatBuffers builder."""
    import flatbuffers
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession as IS

    sess = IS.InferenceSession.GetRootAs(buf, 0)
    res = sess.KernelTypeStrResolver()
    n = res.OpKernelTypeStrArgsLength()
    assert n >= 3
    # Rebuild only the vector of entries, reversed, pointing at the existing entry tables: append
    # the new vector and a new root behind a copy of the whole buffer.
    b = flatbuffers.Builder(len(buf) + 1024)
    b.head = len(b.Bytes) - len(buf)
    b.Bytes[b.head:] = buf
    b.minalign = 64
    entries = [len(buf) - res.OpKernelTypeStrArgs(i)._tab.Pos for i in range(n)]
    b.StartVector(4, n, 4)
    for o in entries:  # prepending in forward order gives the reversed vector
        b.PrependUOffsetTRelative(o)
    vec = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, vec, 0)
    new_res = b.EndObject()
    tab = sess._tab
    b.StartObject(4)
    b.PrependUOffsetTRelativeSlot(0, len(buf) - (tab.Pos + tab.Offset(4) + tab.Get(flatbuffers.number_types.UOffsetTFlags,
                                                                                   tab.Pos + tab.Offset(4))), 0)
    b.PrependUOffsetTRelativeSlot(1, len(buf) - sess.Model()._tab.Pos, 0)
    b.PrependUOffsetTRelativeSlot(3, new_res, 0)
    b.Finish(b.EndObject(), file_identifier=b"ORTM")
    out = bytes(b.Output())
    assert out != buf
    return out


def test_sidecar_metrics_and_lineage_are_copied(tmp_path):
    model = tmp_path / "q.onnx"
    verification = {"passed": True, "cases": [{"case": "random", "max_abs_err": 1e-6}],
                    "accuracy": {"dataset": "digits", "reference": 0.98, "quantized": 0.975}}
    save_model(make_mlp(0), model, {"source": {"kind": "torch", "name": "digits-cnn"}, "task": "classification",
                                    "steps": [{"step": "quantize", "mode": "static"}],
                                    "verification": verification, "speed_check": {"speedup": 2.5}})
    m = bundle.pack(model, tmp_path / "q.tar.gz")
    assert m["metrics"] == {"verification": verification, "speed_check": {"speedup": 2.5}}
    assert m["lineage"]["source"] == {"kind": "torch", "name": "digits-cnn"}
    assert m["lineage"]["steps"] == [{"step": "quantize", "mode": "static"}]
    assert m["lineage"]["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    readme = _members(tmp_path / "q.tar.gz")["README.md"].decode()
    assert "quantize" in readme and "digits" in readme and m["warnings"] == []

    onnx.save(make_mlp(1), model)  # the sidecar now describes other bytes: not copied, and said so
    m = bundle.pack(model, tmp_path / "q2.tar.gz")
    assert m["metrics"] == {} and "source" not in m["lineage"]
    assert any("describes other bytes" in w for w in m["warnings"])


def test_ort_conversion_failure_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    conv = bundle._ort_converter()

    def broken(*a, **k):
        raise RuntimeError("no kernel for op Foo")

    monkeypatch.setattr(conv, "convert_onnx_models_to_ort", broken)
    model = tmp_path / "m.onnx"
    onnx.save(make_mlp(0), model)
    out = tmp_path / "m.tar.gz"
    m = bundle.pack(model, out)
    assert m["model"]["ort"] is None
    assert m["model"]["ort_conversion"]["ok"] is False
    assert "no kernel for op Foo" in m["model"]["ort_conversion"]["reason"]
    assert any("no ORT-format model" in w for w in m["warnings"])
    files = _members(out)
    assert "model.ort" not in files and "required_operators.config" not in files
    assert "No ORT-format model" in files["README.md"].decode()
    report = bundle.verify_bundle(out)
    assert [x["file"] for x in report["models"]] == ["model.onnx"]
    assert bundle.load(out, prefer="ort").model_file == "model.onnx"  # falls back to what is there

    m = bundle.pack(model, tmp_path / "n.tar.gz", ort_format=False)
    assert m["model"]["ort"] is None and m["warnings"] == []

    monkeypatch.undo()  # the converter works again, but making its output reproducible fails:
    monkeypatch.setattr("onnxopt.bundle_ortformat._canonical_ort",
                        lambda buf: (_ for _ in ()).throw(ValueError("new layout")))
    m = bundle.pack(model, tmp_path / "r.tar.gz")
    assert m["model"]["ort"] == "model.ort" and m["model"]["ort_conversion"]["reproducible"] is False
    assert any("differs from run to run" in w and "new layout" in w for w in m["warnings"])
    assert bundle.verify_bundle(tmp_path / "r.tar.gz")["passed"]


def test_bad_pack_inputs_are_refused_and_write_nothing(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(make_mlp(0), model)
    labels3 = tmp_path / "three.txt"
    labels3.write_text("a\nb\nc\n")
    gap = tmp_path / "gap.txt"
    gap.write_text("a\n\nc\nd\n")
    out = tmp_path / "o.tar.gz"
    cases = [
        (dict(model_path=model, output=tmp_path / "o.onnx"), ["o.onnx", ".tar.gz"]),
        (dict(model_path=tmp_path / "missing.onnx", output=out), ["missing.onnx", "no such file"]),
        (dict(model_path=model, output=out, preprocess="imagenet"), ["--preprocess", "[N, 1|3, H, W]"]),
        (dict(model_path=model, output=out, preprocess="bilinear"), ["--preprocess", "bilinear"]),
        (dict(model_path=model, output=out, labels=labels3), ["three.txt", "3 labels", "'y' has 4"]),
        (dict(model_path=model, output=out, labels=gap), ["gap.txt", "line 2 is empty"]),
        (dict(model_path=model, output=out, labels=tmp_path / "nolabels.txt"), ["nolabels.txt", "no such file"]),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for kwargs, needles in cases:
        with pytest.raises(BadInput) as ei:
            bundle.pack(**kwargs)
        for n in needles:
            assert n in str(ei.value), str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---------------------------------------------------------------------------------------------
# tampering


def _repack(src, dst, change) -> None:
    files = _members(src)
    change(files)
    _write_tar(dst, files)


def _changed_weights(files) -> bytes:
    m = onnx.ModelProto()
    m.ParseFromString(files["model.onnx"])
    w = m.graph.initializer[0]
    arr = numpy_helper.to_array(w).copy()
    arr.flat[0] += 5.0
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    return m.SerializeToString()


def _edit_manifest(files, edit) -> None:
    man = json.loads(files["manifest.json"])
    edit(man)
    files["manifest.json"] = json.dumps(man).encode()


def _rehash(files, name) -> None:
    def edit(man):
        man["files"][name] = {"sha256": hashlib.sha256(files[name]).hexdigest(), "bytes": len(files[name])}

    _edit_manifest(files, edit)


TAMPERS = {
    "model bytes changed": (lambda f: f.update({"model.onnx": _changed_weights(f)}), ["model.onnx: changed"]),
    "manifest hash changed": (lambda f: _edit_manifest(f, lambda m: m["files"]["smoke.npz"].update(
        sha256="0" * 64)), ["smoke.npz: changed"]),
    "file missing": (lambda f: f.pop("model.ort"), ["model.ort: missing"]),
    "file added": (lambda f: f.update({"extra.sh": b"rm -rf /\n"}), ["extra.sh: not listed"]),
    # Weights changed and the manifest re-hashed to match: the smoke outputs catch it.
    "model and hash changed": (lambda f: (f.update({"model.onnx": _changed_weights(f)}), _rehash(f, "model.onnx")),
                               ["model.onnx: smoke output 'y'"]),
    "smoke outputs changed": (lambda f: (f.update({"smoke.npz": _zeroed_smoke(f["smoke.npz"])}),
                                         _rehash(f, "smoke.npz")), ["model.onnx: smoke output 'y'",
                                                                    "model.ort: smoke output 'y'"]),
    "manifest not json": (lambda f: f.update({"manifest.json": b"{not json"}), ["manifest.json is not valid JSON"]),
}


def _zeroed_smoke(data: bytes) -> bytes:
    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output_0"] = np.zeros_like(arrays["output_0"])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_tampered_bundle_fails_verification(packed, tmp_path, case):
    _, out, _ = packed
    change, needles = TAMPERS[case]
    bad = tmp_path / "bad.tar.gz"
    _repack(out, bad, change)
    with pytest.raises(VerificationFailed) as ei:
        bundle.verify_bundle(bad)
    assert ei.value.exit_code == 3
    msg = str(ei.value)
    assert msg.startswith(str(bad)) and "\n" not in msg
    for n in needles:
        assert n in msg, msg
    if ei.value.report is not None:  # every error has the field; a bad manifest.json fails before any report
        assert ei.value.report["passed"] is False
    target = tmp_path / "unpacked"
    with pytest.raises(VerificationFailed):
        bundle.load(bad, extract_to=target)
    assert not target.exists()  # nothing half-written: verification failed, so no folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad.tar.gz", "labels.txt", "mlp.onnx",
                                                                 "mlp.tar.gz"])


def test_extract_to_keeps_a_folder_that_loads_and_verifies(packed, tmp_path):
    _, out, _ = packed
    target = tmp_path / "deploy" / "mlp"
    b = bundle.load(out, extract_to=target)
    assert b.root == target
    assert sorted(p.name for p in target.iterdir()) == sorted(_members(out))
    assert bundle.verify_bundle(target)["passed"]
    x = np.ones((2, 16), np.float32)
    np.testing.assert_array_equal(bundle.load(target).predict(x)["outputs"]["y"], b.predict(x)["outputs"]["y"])
    with pytest.raises(BadInput, match="not an empty folder"):
        bundle.load(out, extract_to=target)
    with (target / "model.onnx").open("ab") as f:  # damage the unpacked copy
        f.write(b"\0")
    with pytest.raises(VerificationFailed, match="model.onnx: changed"):
        bundle.verify_bundle(target)
    (target / "model.onnx").unlink()
    (target / "model.onnx").symlink_to(tmp_path / "mlp.onnx")
    with pytest.raises((BadInput, VerificationFailed), match="model.onnx"):
        bundle.verify_bundle(target)


# ---------------------------------------------------------------------------------------------
# unsafe archives


def _info(name, type_=tarfile.REGTYPE, size=0, linkname=""):
    i = tarfile.TarInfo(name)
    i.type, i.size, i.linkname = type_, size, linkname
    return i


def _malicious(path, kind, outside):
    """Write an archive whose entry ``kind`` is unsafe; ``outside`` is where an unsafe
    extraction would write."""
    good = [(_info("manifest.json", size=2), b"{}")]
    if kind == "oversized claim":  # a header claiming 3 GiB followed by a few bytes of data
        hdr = _info("model.onnx", size=3 * 2**30).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        path.write_bytes(gzip.compress(hdr + b"\0" * 1024))
        return "model.onnx"
    if kind == "too many entries":
        entries = [(_info(f"f{i}.txt", size=1), b"x") for i in range(bundle.MAX_MEMBERS + 1)]
        bad = f"f{bundle.MAX_MEMBERS}.txt"
    else:
        rel = "../" * 8 + str(outside).lstrip("/")
        bad, entry = {
            "dotdot": ("../evil", (_info("../evil", size=4), b"evil")),
            "deep dotdot": (rel, (_info(rel, size=4), b"evil")),
            "absolute": (str(outside), (_info(str(outside), size=4), b"evil")),
            "symlink": ("link", (_info("link", tarfile.SYMTYPE, linkname=str(outside)), None)),
            "relative symlink": ("sub/link", (_info("sub/link", tarfile.SYMTYPE, linkname="../../x"), None)),
            "hardlink": ("hard", (_info("hard", tarfile.LNKTYPE, linkname=str(outside)), None)),
            "fifo": ("pipe", (_info("pipe", tarfile.FIFOTYPE), None)),
            "char device": ("null", (_info("null", tarfile.CHRTYPE), None)),
            "duplicate": ("manifest.json", (_info("manifest.json", size=2), b"{}")),
        }[kind]
        entries = good + [entry]
    with tarfile.open(path, "w:gz") as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return bad


@pytest.mark.parametrize("kind", ["dotdot", "deep dotdot", "absolute", "symlink", "relative symlink", "hardlink",
                                  "fifo", "char device", "duplicate", "oversized claim", "too many entries"])
def test_unsafe_archive_is_refused_before_anything_is_written(tmp_path, kind):
    outside = tmp_path / "outside" / "evil"
    outside.parent.mkdir()
    arc = tmp_path / "work" / "evil.tar.gz"
    arc.parent.mkdir()
    bad = _malicious(arc, kind, outside)
    target = tmp_path / "work" / "unpacked"
    for call in (lambda: bundle.verify_bundle(arc), lambda: bundle.load(arc),
                 lambda: bundle.load(arc, extract_to=target)):
        with pytest.raises(BadInput) as ei:
            call()
        msg = str(ei.value)
        assert ei.value.exit_code == 2 and "\n" not in msg
        assert msg.startswith(str(arc)) and bad in msg, msg
    assert list(outside.parent.iterdir()) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "work" / "evil").exists()
    assert sorted(p.name for p in arc.parent.iterdir()) == ["evil.tar.gz"]  # no folder, no temp left


def test_unpacked_size_cap(packed, monkeypatch):
    _, out, _ = packed
    monkeypatch.setattr("onnxopt.bundle_verify.MAX_TOTAL_BYTES", 2000)  # the bundle unpacks to ~7 KB
    with pytest.raises(BadInput, match="over the 2,000-byte limit"):
        bundle.verify_bundle(out)


def test_not_a_bundle(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"hello" * 100)
    with pytest.raises(BadInput, match="junk.tar.gz: is not a readable .tar.gz bundle"):
        bundle.verify_bundle(junk)
    plain = tmp_path / "plain.tar.gz"
    _write_tar(plain, {"notes.txt": b"hi"})
    with pytest.raises(BadInput, match="not an onnxopt bundle"):
        bundle.verify_bundle(plain)
    with pytest.raises(BadInput, match="no such file"):
        bundle.verify_bundle(tmp_path / "nothing.tar.gz")


# ---------------------------------------------------------------------------------------------
# preprocessing: the same arrays onnxopt.data.images makes from image files


def _image_model(c: int) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((c * 8 * 8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["img"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])],
        "img", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", c, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("kind,c", [("imagenet", 3), ("unit", 3), ("raw", 3), ("imagenet", 1)])
def test_predict_preprocesses_like_the_image_folder_reader(tmp_path, kind, c):
    Image = pytest.importorskip("PIL.Image")
    from onnxopt.data.images import load_image_folder

    model = tmp_path / "img.onnx"
    onnx.save(_image_model(c), model)
    out = tmp_path / "img.tar.gz"
    m = bundle.pack(model, out, preprocess=kind, labels=["cat", "dog", "fox"])
    assert m["preprocessing"]["kind"] == kind and m["preprocessing"]["input"] == "img"
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    # One image that needs resizing (and cropping), one already at the size the resize gives.
    size2 = (9, 9) if kind == "imagenet" else (8, 8)  # imagenet resizes the shorter side to round(8 / 0.875) = 9
    pix = [rng.integers(0, 256, (13, 17, 3), dtype=np.uint8), rng.integers(0, 256, size2 + (3,), dtype=np.uint8)]
    for i, p in enumerate(pix):
        Image.fromarray(p).save(folder / f"{i}.png")
    x_ref, _, _ = load_image_folder(folder, (1, c, 8, 8), preprocess=kind)

    b = bundle.load(out)
    feeds = b.preprocess(pix)  # uint8 HWC arrays
    np.testing.assert_array_equal(feeds["img"], x_ref)
    np.testing.assert_array_equal(b.preprocess(str(folder / "0.png"))["img"], x_ref[:1])  # a file path
    np.testing.assert_array_equal(b.preprocess(Image.open(folder / "1.png"))["img"], x_ref[1:])  # a PIL image
    res = b.predict(np.stack([pix[1], pix[1]]))  # N x H x W x C
    import onnxruntime as ort

    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"img": x_ref[1:]})[0]
    np.testing.assert_allclose(res["outputs"]["logits"], np.concatenate([ref, ref]), rtol=1e-5, atol=1e-5)
    assert res["labels"] == [["cat", "dog", "fox"][int(ref.argmax())]] * 2
    with pytest.raises(BadInput, match="uint8"):
        b.predict(pix[0].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# CLI


def _cli():
    from onnxopt.cli import _Group, main

    if "pack" in main.commands and "verify-bundle" in main.commands:
        return main
    return _Group("onnxopt", commands={"pack": cli_pack, "verify-bundle": cli_verify})


def test_cli_pack_and_verify_bundle(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(make_mlp(0), model)
    out = tmp_path / "m.tar.gz"
    cli = _cli()
    for cmd in (["pack"], ["verify-bundle"]):
        res = CliRunner().invoke(cli, cmd + ["-h"])
        assert res.exit_code == 0 and "Examples:" in res.output
    res = CliRunner().invoke(cli, ["pack", str(model), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"]["ort"] == "model.ort"  # stdout is pure JSON
    res = CliRunner().invoke(cli, ["verify-bundle", str(out)])
    assert res.exit_code == 0, res.output
    assert "verified" in res.stdout and "model.ort" in res.stdout

    bad = tmp_path / "bad.tar.gz"
    _repack(out, bad, lambda f: f.update({"model.onnx": _changed_weights(f)}))
    res = CliRunner().invoke(cli, ["verify-bundle", str(bad)])
    assert res.exit_code == 3
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "model.onnx: changed" in errors[0] and "Traceback" not in res.output
    assert "changed" in res.stderr  # the per-file table goes to stderr too
    res = CliRunner().invoke(cli, ["verify-bundle", str(bad), "--json"])
    assert res.exit_code == 3 and json.loads(res.stdout)["passed"] is False

    evil = tmp_path / "evil.tar.gz"
    _malicious(evil, "dotdot", tmp_path / "x")
    res = CliRunner().invoke(cli, ["verify-bundle", str(evil)])
    assert res.exit_code == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "evil.tar.gz" in errors[0] and "../evil" in errors[0]

    res = CliRunner().invoke(cli, ["pack", str(model), "-o", str(tmp_path / "x.tar.gz"), "--preprocess", "unit"])
    assert res.exit_code == 2 and "--preprocess" in res.stderr
    assert not (tmp_path / "x.tar.gz").exists()


def test_pack_a_model_random_inputs_cannot_run_with_real_data(tmp_path):
    """A sample rate and a recurrent state cannot be invented: without --data, pack refuses and
    says so; with recorded feeds, the smoke input is their first sample, and the bundle verifies."""
    from test_inspect import make_vad

    from onnxopt.feeds import save_samples

    src = tmp_path / "vad.onnx"
    onnx.save(make_vad(), src)
    with pytest.raises(BadInput, match="integer scalar.*--data"):
        bundle.pack(src, tmp_path / "a.tar.gz")
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((1, 512)).astype(np.float32),
              "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)} for _ in range(3)]
    save_samples(tmp_path / "feeds.npz", feeds)
    manifest = bundle.pack(src, tmp_path / "b.tar.gz", data=str(tmp_path / "feeds.npz"))
    smoke = {i["name"]: i for i in manifest["smoke"]["inputs"]}
    assert smoke["sr"]["shape"] == [] and smoke["state"]["shape"] == [2, 1, 128]
    assert manifest["smoke"]["from"].startswith("the first sample")
    with tarfile.open(tmp_path / "b.tar.gz") as t:
        arrays = np.load(io.BytesIO(t.extractfile("smoke.npz").read()))
        key = smoke["sr"]["key"]
        assert arrays[key].tolist() == 16000, (key, arrays[key].shape, arrays[key].dtype)
    res = CliRunner().invoke(cli_verify, [str(tmp_path / "b.tar.gz")])
    assert res.exit_code == 0, res.output
