"""The CLI end to end: help texts, the main job on the default model, and bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxopt.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    """The real console entry point in a subprocess: exit code, stdout and stderr as a user sees them."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent) + os.pathsep + str(ROOT), ONNXOPT_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "onnxopt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


@pytest.mark.parametrize("cmd", [[], ["models"], ["export"], ["bench"], ["optimize"], ["quantize"], ["simplify"],
                                 ["prune"], ["run"], ["report"], ["pack"], ["verify-bundle"],
                                 ["ensemble"], ["head"], ["distill"]])
def test_help_shows_an_example(cmd):
    res = CliRunner().invoke(main, cmd + ["--help"])
    assert res.exit_code == 0 and "Example" in res.output


def test_models_lists_builtins_as_json():
    res = CliRunner().invoke(main, ["models", "--json"])
    assert res.exit_code == 0
    names = {m["name"] for m in json.loads(res.stdout)}
    assert {"digits-cnn", "resnet18", "mobilenet_v2", "minilm"} <= names


def test_optimize_default_model_end_to_end(tmp_path):
    out = tmp_path / "out"
    res = run_cli("optimize", "--out", out, "--duration", "0.5", "--batch", "1,8", "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)  # stdout is pure JSON: progress and logs went to stderr
    assert rep["artifact"]["verification"]["passed"]
    rows = rep["bench"]["rows"]
    assert {r["model"] for r in rows} == {"digits-cnn (ONNX fp32)", "digits-cnn (PyTorch eager)"}
    assert {r["batch"] for r in rows} == {1, 8}
    onnx_acc = [r["accuracy"] for r in rows if "ONNX" in r["model"]]
    assert min(onnx_acc) >= 0.97
    assert sorted(p.name for p in out.iterdir()) == ["digits-cnn.onnx", "digits-cnn.onnxopt.json", "report.json",
                                                    "report.md"]
    assert json.loads((out / "report.json").read_text())["bench"]["reference"] == "digits-cnn (ONNX fp32)"


def _assert_clean_error(res, out: Path, *needles, code=2):
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists() or not any(out.parent.glob(out.name + "*")), "output left behind"
    assert not list(out.parent.glob(".*.tmp")), "temp file left behind"


def test_bad_inputs_give_one_line_and_exit_2(tmp_path):
    out = tmp_path / "o.onnx"
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    good = tmp_path / "good.onnx"
    from conftest import make_mlp
    import onnx

    onnx.save(make_mlp(0), good)
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [
        (["bench", tmp_path / "missing.onnx"], ["missing.onnx", "no such file"]),
        (["bench", text], ["notes.onnx", "not an ONNX model"]),
        (["bench", trunc], ["trunc.onnx"]),
        (["optimize", trunc, "--out", tmp_path / "o"], ["trunc.onnx"]),
        (["export", "no-such-model", "-o", out], ["no-such-model", "unknown built-in model"]),
        (["export", "nosuchpkg.mod:make", "--input-shape", "1x3", "-o", out], ["cannot import module"]),
        (["export", "factories:not_a_module", "--input-shape", "1x6", "-o", out], ["not a torch.nn.Module"]),
        (["export", "factories:tiny_net", "-o", out], ["needs an input shape"]),
        (["export", "factories:tiny_net", "--input-shape", "1x5x8x8", "-o", out], ["rejects inputs of shape input 1x5x8x8", "3 channels"]),
        (["export", "factories:tiny_net", "--input-shape", "1xAx8", "-o", out], ["not a shape"]),
        (["bench", good, "--data", tmp_path / "nope.npz"], ["nope.npz", "no such file"]),
        (["bench", good, "--batch", "0"], ["--batch"]),
        (["export", good, "-o", out], ["already an ONNX file"]),
    ]
    for args, needles in cases:
        _assert_clean_error(run_cli(*args), out, *needles)


def test_weights_that_do_not_match(tmp_path):
    import torch
    from torch import nn

    w = tmp_path / "w.pt"
    torch.save(nn.Linear(3, 3).state_dict(), w)
    out = tmp_path / "o.onnx"
    res = run_cli("export", "factories:tiny_net", "--input-shape", "1x3x8x8", "--weights", w, "-o", out)
    _assert_clean_error(res, out, "w.pt", "weights do not match")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    res = run_cli("export", "factories:tiny_net", "--input-shape", "1x3x8x8", "--weights", junk, "-o", out)
    _assert_clean_error(res, out, "junk.pt", "cannot load weights")


def test_factory_export_with_weights(tmp_path):
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from factories import tiny_net

    net = tiny_net()
    with torch.no_grad():
        net.conv.bias.fill_(-1.0)  # relu(conv(0)) = 0, so the output is fc's bias alone
        net.fc.bias.fill_(3.0)
    w = tmp_path / "w.pt"
    torch.save(net.state_dict(), w)
    out = tmp_path / "net.onnx"
    res = run_cli("export", "factories:tiny_net", "--input-shape", "1x3x8x8", "--weights", w, "-o", out, "--json")
    assert res.returncode == 0, res.stderr
    side = json.loads(res.stdout)
    assert side["verification"]["passed"] and side["source"]["kind"] == "factory"
    import numpy as np
    import onnxruntime as ort

    y = ort.InferenceSession(str(out)).run(None, {"input": np.zeros((2, 3, 8, 8), np.float32)})[0]
    assert y.shape == (2, 5) and np.allclose(y, 3.0, atol=1e-5)  # the weights were loaded


def test_verification_failure_exits_3_and_writes_nothing(tmp_path):
    out = tmp_path / "branch.onnx"
    res = run_cli("export", "factories:shape_branch_net", "--input-shape", "1x6", "--exporter", "torchscript",
                  "-o", out)
    _assert_clean_error(res, out, "does not match PyTorch", "random b1", code=3)
    assert "FAIL" in res.stderr  # the verification table is shown
    assert list(tmp_path.iterdir()) == []


def test_bench_data_of_the_wrong_shape(tmp_path):
    import numpy as np
    import onnx
    from conftest import make_mlp

    good = tmp_path / "good.onnx"
    onnx.save(make_mlp(0), good)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 12), np.float32), labels=np.zeros(4, np.int64))
    res = run_cli("bench", good, "--data", tmp_path / "d.npz", "--duration", "0.1")
    _assert_clean_error(res, tmp_path / "none", "d.npz", "expects shape batchx16, got 4x12")


def test_cuda_only_without_cuda_is_a_clear_error(mlp_path):
    from onnxopt.runtime import available_providers

    if "cuda" in available_providers():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(main, ["bench", str(mlp_path), "--provider", "cuda", "--duration", "0.1"])
    assert res.exit_code == 2 and "cuda is not available" in res.stderr


def test_quantize_digits_end_to_end(tmp_path):
    fp32 = tmp_path / "d.onnx"
    assert run_cli("export", "digits-cnn", "-o", fp32).returncode == 0
    q = tmp_path / "dq.onnx"
    res = run_cli("quantize", fp32, "-o", q, "--data", "digits", "--max-drop", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    side = json.loads(res.stdout)
    assert side["quantize"]["chosen"] == "static" and side["gate"]["passed"]
    assert side["verification"]["accuracy"]["drop_points"] <= 0.5
    assert [s["step"] for s in side["steps"]] == ["export", "quantize"]  # lineage carried over
    assert q.stat().st_size < fp32.stat().st_size / 2
    # quantizing it again is refused, and nothing is written
    again = tmp_path / "dqq.onnx"
    _assert_clean_error(run_cli("quantize", q, "-o", again), again, "already quantized")
    res = run_cli("quantize", fp32, "-o", again, "--mode", "turbo")
    assert res.returncode == 2 and "turbo" in res.stderr and not again.exists()


def test_quantize_fallback_and_gate_errors_from_the_shell(tmp_path):
    import numpy as np
    import onnx

    from onnxopt.runtime import make_session
    from test_fallback import make_outlier_mlp

    proto = make_outlier_mlp()
    src = tmp_path / "mlp.onnx"
    onnx.save(proto, src)
    x = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=make_session(proto).run(None, {"x": x})[0].argmax(1))
    q = tmp_path / "q.onnx"
    res = run_cli("quantize", src, "-o", q, "--data", tmp_path / "d.npz", "--max-drop", "1pt", "--no-speed-check")
    assert res.returncode == 0, res.stderr
    assert "fallback: first try dropped" in res.stdout and "3 node(s) kept in float" in res.stdout
    bad = tmp_path / "bad.onnx"
    _assert_clean_error(run_cli("quantize", src, "-o", bad, "--data", tmp_path / "d.npz", "--max-drop", "lots"),
                        bad, "--max-drop", "'lots'")
    res = run_cli("quantize", src, "-o", bad, "--data", tmp_path / "d.npz", "--max-drop", "1", "--no-fallback")
    assert res.returncode == 3 and "accuracy dropped" in res.stderr and "Traceback" not in res.stderr
    # a failed gate still writes the model and its report, named so nothing takes it for the result
    assert not bad.exists() and bad.with_name("bad.rejected.onnx").exists() and "bad.rejected.onnx" in res.stderr


def test_prune_digits_from_the_shell(tmp_path):
    fp32 = tmp_path / "d.onnx"
    assert run_cli("export", "digits-cnn", "-o", fp32).returncode == 0
    out = tmp_path / "dp.onnx"
    res = run_cli("prune", fp32, "-o", out, "--data", "digits", "--amount", "0.5", "--max-drop", "1.5")
    assert res.returncode == 0, res.stderr
    assert "(0.255x)" in res.stdout and "32 -> 16" in res.stdout and "left alone: node_linear" in res.stdout
    side = json.loads((tmp_path / "dp.onnxopt.json").read_text())
    assert [s["step"] for s in side["steps"]] == ["export", "prune"] and side["gate"]["passed"]
    # pruned + INT8 compose: quantize reads the pruned artifact and keeps its lineage
    q = tmp_path / "dpq.onnx"
    res = run_cli("quantize", out, "-o", q, "--json")
    assert res.returncode == 0, res.stderr
    assert [s["step"] for s in json.loads(res.stdout)["steps"]] == ["export", "prune", "quantize"]
    bad = tmp_path / "bad.onnx"
    _assert_clean_error(run_cli("prune", fp32, "-o", bad, "--amount", "1.5"), bad, "--amount")
    _assert_clean_error(run_cli("prune", fp32, "-o", bad, "--finetune-epochs", "1"), bad, "--finetune-epochs",
                        "torch source")
    _assert_clean_error(run_cli("prune", "digits-cnn", "-o", bad), bad, "--finetune-epochs")


def test_optimize_searches_when_given_a_gate(tmp_path):
    fp32 = tmp_path / "d.onnx"
    assert run_cli("export", "digits-cnn", "-o", fp32).returncode == 0
    out = tmp_path / "run"
    res = run_cli("optimize", fp32, "-o", out, "--data", "digits", "--max-drop", "0.5", "--batch", "64",
                  "--duration", "0.3", "--no-memory", "--budget", "60")
    assert res.returncode == 0, res.stderr
    assert "(chosen)" in res.stdout and "best:" in res.stdout
    report = json.loads((out / "report.json").read_text())
    chosen = next(v for v in report["variants"] if v["name"] == report["chosen"])
    assert chosen["drop_points"] <= 0.5 and (out / "best.onnx").exists() and (out / "report.html").exists()
    res = run_cli("optimize", fp32, "-o", tmp_path / "none", "--data", "digits", "--min-speedup", "1000",
                  "--batch", "64", "--duration", "0.2", "--no-memory")
    assert res.returncode == 3 and "no variant holds every gate" in res.stderr
    assert (tmp_path / "none" / "report.json").exists()


def test_simplify_no_skip_layer_norm_flag(tmp_path):
    """--no-skip-layer-norm reaches the pass: the residual Add is kept apart (as Sum) and said so."""
    import onnx

    from test_simplify import _residual_layernorm_graph

    src = tmp_path / "res.onnx"
    onnx.save(_residual_layernorm_graph(), src)
    ops = {}
    for flag in ("--skip-layer-norm", "--no-skip-layer-norm"):
        out = tmp_path / f"{flag}.onnx"
        res = CliRunner().invoke(main, ["simplify", str(src), "-o", str(out), "--transformer", "bert", flag])
        assert res.exit_code == 0, res.output
        ops[flag] = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert ("kept apart from LayerNorm" in res.output) == (flag == "--no-skip-layer-norm")
    assert "SkipLayerNormalization" in ops["--skip-layer-norm"]
    assert {"Sum", "LayerNormalization"} <= ops["--no-skip-layer-norm"]
