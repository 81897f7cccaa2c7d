"""Bad inputs, as a careless or hostile user gives them: each is one `error:` line with the right
exit code, no traceback, nothing left behind, the input unchanged. Hostile files are generated
here; none is committed.

Output paths (this file's first part): the input as its own output (also through a hard link or
a symbolic link), a folder, an empty name, a name over the filesystem's limit, a folder that
cannot be created.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import onnx
import pytest
from click.testing import CliRunner

from conftest import make_mlp
from onnxopt.cli import main

COMMANDS = {  # a command that writes a variant of the input, with what it needs
    "simplify": ["simplify"],
    "quantize": ["quantize", "--mode", "dynamic", "--no-speed-check"],
    "prune": ["prune", "--method", "magnitude", "--amount", "0.5"],
}


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    onnx.save(make_mlp(), path)
    return path


def _run(args, cwd) -> tuple[int, list[str], str]:
    """The CLI in-process, in ``cwd``, with its own temp folder, which must be empty afterwards."""
    import tempfile

    old, old_tmp = os.getcwd(), tempfile.tempdir
    scratch = tempfile.mkdtemp(prefix="scratch-", dir=os.path.dirname(str(cwd)))
    os.chdir(cwd)
    tempfile.tempdir = scratch
    try:
        res = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)
        tempfile.tempdir = old_tmp
    left = os.listdir(scratch)
    os.rmdir(scratch) if not left else None
    assert not left, f"left in the temp folder: {sorted(left)}"
    err = res.stderr if hasattr(res, "stderr") else res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        err += f"\n{type(res.exception).__name__}: {res.exception}"  # an uncaught exception: a traceback
    return res.exit_code, [ln for ln in err.splitlines() if ln.startswith("error:")], err


def _assert_refused(code, lines, err, *, exit_code=2, says=""):
    assert code == exit_code, err
    assert len(lines) == 1 and len(lines[0]) < 300 and "Traceback" not in err and "Error:" not in err, err
    assert any(s in lines[0] for s in ((says,) if isinstance(says, str) else says)), lines[0]


def _files(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("how", ["same path", "hard link", "symbolic link", "relative path"])
def test_the_input_is_never_its_own_output(model, tmp_path, command, how):
    before, listing = _digest(model), _files(model.parent)
    target = model
    if how == "hard link":
        target = tmp_path / "in" / "hard.onnx"
        os.link(model, target)
    elif how == "symbolic link":
        target = tmp_path / "in" / "soft.onnx"
        target.symlink_to(model)
    elif how == "relative path":
        target = "m.onnx"
    listing = _files(model.parent)
    code, lines, err = _run([*COMMANDS[command][:1], model, *COMMANDS[command][1:], "-o", target], model.parent)
    _assert_refused(code, lines, err, says="is the input model")
    assert _digest(model) == before and _files(model.parent) == listing


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_output_paths_that_cannot_be_written(model, tmp_path, command):
    cases = {
        "a folder": (tmp_path / "in", "is a folder"),
        "empty": ("", "is empty"),
        "too long": (tmp_path / ("x" * 300 + ".onnx"), "too long"),
        "under a file": (model / "sub" / "out.onnx", "cannot create the output folder"),
        "in /proc": ("/proc/onnxopt-no-such-dir/out.onnx", "cannot create the output folder"),
    }
    listing = _files(tmp_path)
    for name, (out, says) in cases.items():
        code, lines, err = _run([*COMMANDS[command][:1], model, *COMMANDS[command][1:], "-o", out], tmp_path)
        _assert_refused(code, lines, err, says=says)
        assert _files(tmp_path) == listing, name


# ---- options that contradict each other or are not numbers ----------------------------------

@pytest.mark.parametrize("args,says", [
    (["bench", "{m}", "--duration", "nan"], "--duration"),
    (["bench", "{m}", "--duration", "inf"], "--duration"),
    (["bench", "{m}", "--duration", "-1"], "--duration"),
    (["optimize", "{m}", "--no-search", "--max-drop", "0.5"], "--no-search"),
    (["optimize", "{m}", "--min-cosine", "0.9", "--budget", "-5"], "--budget"),
    (["optimize", "{m}", "--min-cosine", "0.9", "--budget", "nan"], "--budget"),
    (["prune", "{m}", "-o", "{o}", "--method", "magnitude", "--threshold", "0.1", "--amount", "0.3"], "--threshold"),
    (["prune", "{m}", "-o", "{o}", "--method", "channel", "--threshold", "0.1"], "--threshold"),
    (["prune", "{m}", "-o", "{o}", "--method", "nm", "--amount", "0.3"], "--amount"),
])
def test_contradicting_or_non_numeric_options(model, tmp_path, args, says):
    out = tmp_path / "out" / "v.onnx"
    args = [a.format(m=model, o=out) for a in args]
    code, lines, err = _run(args, tmp_path)
    _assert_refused(code, lines, err, says=says)
    assert not (tmp_path / "out").exists() and not (tmp_path / "optimize").exists()


# ---- recipes ------------------------------------------------------------------------------------

def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 9)}]")
    return "model: m.onnx\nsteps: [simplify]\ngates:\n  " + "\n  ".join(lines) + "\n"


RECIPES = {
    "python tag": ("model: !!python/object/apply:os.system ['echo hacked']\nsteps: [simplify]\n", "plain data"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a text file"),
    "budget as words": ("model: {m}\nsteps: [simplify]\nbudget_s: ten minutes\n", "budget_s"),
    "negative budget": ("model: {m}\nsearch: auto\ngates: {{min_cosine: 0.9}}\nbudget_s: -5\n", "budget_s"),
    "nan budget": ("model: {m}\nsearch: auto\ngates: {{min_cosine: 0.9}}\nbudget_s: .nan\n", "budget_s"),
    "model a number": ("model: 42\nsteps: [simplify]\n", "model: must be a string"),
    "model a list": ("model: [a, b]\nsteps: [simplify]\n", "must be a string"),
    "alias bomb 9 levels": (_bomb(9), "aliases"),
    "duration as words": ("model: {m}\nsteps: [simplify]\ntarget: {{duration: soon}}\n", "target"),
    "gate as words": ("model: {m}\nsteps: [simplify]\ngates: {{min_cosine: high}}\n", "min_cosine"),
    "not a mapping": ("- just\n- a list\n", "mapping"),
    "empty": ("", "mapping"),
    "bad yaml": ("model: [unclosed\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_bad_recipes_are_one_line_before_any_work(model, tmp_path, case):
    import time

    body, says = RECIPES[case]
    recipe = tmp_path / "r.yaml"
    if isinstance(body, bytes):
        recipe.write_bytes(body)
    else:
        recipe.write_text(body.format(m=model))
    t0 = time.perf_counter()
    code, lines, err = _run(["run", recipe, "-o", tmp_path / "out"], tmp_path)
    assert time.perf_counter() - t0 < 10, "validation must not expand the recipe"
    _assert_refused(code, lines, err, says=says)
    assert not (tmp_path / "out").exists()


# ---- Ctrl-C ---------------------------------------------------------------------------------

@pytest.mark.parametrize("after_s", [0.2, 0.7, 1.5, 3.0, 5.0])
def test_ctrl_c_at_any_moment_is_one_line_and_leaves_nothing(model, tmp_path, after_s):
    """While the package loads, while it calibrates, while it writes: one line, exit 130 (or
    the command finished first: exit 0 and a whole model), never a traceback or a temp file."""
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    out = tmp_path / "out" / "q.onnx"
    data = model.parent / "x.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))
    p = subprocess.Popen([sys.executable, "-m", "onnxopt.cli", "quantize", str(model), "-o", str(out),
                          "--mode", "static", "--data", str(data), "--no-speed-check"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(after_s)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    left = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file() and "in" not in f.parts)
    assert not [f for f in left if f.endswith(".tmp")], left
    if p.returncode in (0, -signal.SIGINT):  # done before the signal, or it came while the interpreter exited
        assert "Traceback" not in err and ("error:" not in err or p.returncode != 0), err
        assert left in ([], ["out/q.onnx", "out/q.onnxopt.json"]), left
    else:
        assert p.returncode == 130, err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert lines == [lines[0]] and "interrupted" in lines[0] and "Traceback" not in err, err
        assert left == [], left


# ---- files ONNX Runtime or memory cannot take -------------------------------------------------

def _tiny(nodes, inputs, outputs, opset=17, domains=(), inits=()):
    from onnx import helper

    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset),
                                            *[helper.make_opsetid(d, 1) for d in domains]])
    m.ir_version = 8
    return m


def _hostile_files(folder):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    w = numpy_helper.from_array(np.ones((16, 4), np.float32), "w")
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])
    huge = helper.make_tensor_value_info("x", TensorProto.FLOAT, [100000, 100000])
    files = {
        "custom op": (_tiny([helper.make_node("MatMul", ["x", "w"], ["h"]),
                             helper.make_node("Foo", ["h"], ["y"], domain="my.domain")], [x], [y],
                            domains=["my.domain"], inits=[w]), "my.domain:Foo"),
        "opset 30": (_tiny([mm], [x], [y], opset=30, inits=[w]), "opset 30"),
        "opset 26 (onnx knows it, maybe not ORT)": (_tiny([mm], [x], [y], opset=26, inits=[w]), ""),
        "no outputs": (_tiny([mm], [x], [], inits=[w]), "declares no outputs"),
        "an Expand to 100000x100000": (_tiny([helper.make_node("Expand", ["x", "shape"], ["y"])],
                                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
                                              inits=[numpy_helper.from_array(np.array([100000, 100000], np.int64),
                                                                             "shape")]),
                                        ("would take", "can be pruned")),
        "a dim stored as -5": (_tiny([mm], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-5, 16])], [y],
                                     inits=[w]), ("-5", "negative")),
        "100000x100000 input": (_tiny([helper.make_node("Relu", ["x"], ["y"])], [huge],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [100000, 100000])]),
                                ("GiB", "can be pruned")),  # prune refuses a Relu-only graph first
    }
    out = {}
    for name, (proto, says) in files.items():
        path = folder / (name.split(" (")[0].replace(" ", "_") + ".onnx")
        onnx.save(proto, path)
        out[name] = (path, says)
    return out


@pytest.mark.parametrize("command", ["simplify", "quantize", "prune", "bench"])
def test_files_onnx_runtime_or_memory_cannot_take(tmp_path, command):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, (path, says) in _hostile_files(folder).items():
        before = _digest(path)
        args = [command, path] + ([] if command == "bench" else ["-o", tmp_path / "out" / "v.onnx"])
        args += {"quantize": ["--mode", "dynamic", "--no-speed-check"], "prune": ["--method", "magnitude"],
                 "bench": ["--duration", "0.1", "--no-memory"]}.get(command, [])
        code, lines, err = _run(args, tmp_path)
        if name.startswith("a dim stored as -5"):  # treated as an open dim, or refused, never "use --batch -5"
            assert code in (0, 2) and "--batch -5" not in err and "Traceback" not in err, err
            shutil.rmtree(tmp_path / "out", ignore_errors=True)
            continue
        if name.startswith("opset 26") and code == 0:
            shutil.rmtree(tmp_path / "out", ignore_errors=True)
            continue  # this ONNX Runtime runs it: fine
        _assert_refused(code, lines, err, says=says)
        assert "onnxruntime_src" not in lines[0] and "[ONNXRuntimeError]" not in lines[0], lines[0]
        assert _digest(path) == before and not (tmp_path / "out").exists(), name
        assert _files(tmp_path) == {"in", *(f"in/{p.name}" for p in folder.iterdir())}, name


# ---- data -------------------------------------------------------------------------------------

def _bad_data(folder):
    import numpy as np

    rng = np.random.default_rng(0)
    ok = rng.standard_normal((8, 16)).astype(np.float32)
    nan = ok.copy()
    nan[3, 2] = np.nan
    cases = {
        "strings": ({"x": np.array([["abc"] * 16] * 4)}, "expects float32, got <U3"),
        "nan": ({"x": nan}, "NaN"),
        "wrong rank": ({"x": ok[:, :, None]}, "expects rank 2"),
        "wrong fixed dim": ({"x": ok[:, :15]}, "expects shape"),
        "labels of another length": ({"x": ok, "labels": np.zeros(5, np.int64)}, "different numbers of samples"),
        "float labels": ({"x": ok, "labels": np.zeros(8)}, "labels must be integers"),
        "object array": ({"x": np.array([{"a": 1}] * 8, dtype=object)}, "cannot read it"),
        "samples with other inputs": ({"sample0000/x": ok[:1], "sample0001/z": ok[:1]}, "sample 1 has inputs"),
        "a stray key among samples": ({"sample0000/x": ok[:1], "junk": ok}, "is not 'sampleNNNN/"),
    }
    out = {}
    for name, (arrays, says) in cases.items():
        path = folder / (name.replace(" ", "_") + ".npz")
        np.savez(path, **arrays)
        out[name] = (path, says)
    (folder / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    out["corrupt"] = (folder / "corrupt.npz", "cannot read it")
    out["missing"] = (folder / "nope.npz", "no such file")
    out["unknown kind"] = (folder / "data.csv", "unknown dataset")
    return out


@pytest.mark.parametrize("command", ["quantize", "prune", "simplify"])
def test_bad_data_is_named_by_its_file(model, tmp_path, command):
    for name, (path, says) in _bad_data(model.parent).items():
        args = [command, model, "-o", tmp_path / "out" / "v.onnx", "--data", path]
        args += {"quantize": ["--mode", "static", "--no-speed-check"], "prune": ["--method", "channel"]}.get(command, [])
        code, lines, err = _run(args, tmp_path)
        _assert_refused(code, lines, err, says=says)
        assert path.name in lines[0], lines[0]
        assert not (tmp_path / "out").exists(), name


def test_an_unwritable_folder_is_one_line(model, tmp_path, monkeypatch):
    """As root chmod cannot make a folder unwritable, so the OS's refusal is simulated where the
    temp file is made; nothing is left, the line names the output."""
    import onnxopt.artifact as artifact

    def refuse(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(artifact.tempfile, "mkstemp", refuse)
    out = tmp_path / "ro" / "v.onnx"
    code, lines, err = _run(["simplify", model, "-o", out], tmp_path)
    _assert_refused(code, lines, err, says="Permission denied")
    assert str(out) in lines[0] and not out.exists()


# ---- input files that are not models ----------------------------------------------------------

def _not_models(folder, model):
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    data = model.read_bytes()
    cases = {}
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (folder / "truncated.onnx", "")
    (folder / "text.onnx").write_text("this is not a model\n")
    cases["a text file"] = (folder / "text.onnx", "")
    (folder / "empty.onnx").write_bytes(b"")
    cases["empty"] = (folder / "empty.onnx", "")
    (folder / "dir.onnx").mkdir()
    cases["a folder"] = (folder / "dir.onnx", "")
    cases["missing"] = (folder / "missing.onnx", "no such file")
    w = numpy_helper.from_array(np.ones((16, 4), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "256")):
        w.external_data.add(key=k, value=v)
    (folder.parent / "secret.bin").write_bytes(b"\0" * 256)
    m = _tiny([helper.make_node("MatMul", ["x", "w"], ["y"])],
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], inits=[w])
    (folder / "escape.onnx").write_bytes(m.SerializeToString())
    cases["external data outside its folder"] = (folder / "escape.onnx", "")
    return cases


@pytest.mark.parametrize("command", ["simplify", "quantize", "prune", "bench", "inspect"])
def test_input_files_that_are_not_models(model, tmp_path, command):
    for name, (path, says) in _not_models(model.parent, model).items():
        args = [command, path] + (["-o", tmp_path / "out" / "v.onnx"] if command not in ("bench", "inspect") else [])
        args += {"quantize": ["--mode", "dynamic"], "bench": ["--duration", "0.1"]}.get(command, [])
        code, lines, err = _run(args, tmp_path)
        _assert_refused(code, lines, err, says=says)
        assert str(path.name) in lines[0], (name, lines[0])
        assert not (tmp_path / "out").exists(), name
