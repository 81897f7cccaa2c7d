"""Knowledge distillation on a tiny digits task: it learns, resumes exactly, runs under DDP."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest

from onnxopt.errors import BadInput
from onnxopt.feeds import Dataset

torch = pytest.importorskip("torch")

TINY = 400  # training images of the tiny task (the digits test split stays unseen)
KW = dict(width=0.25, epochs=3, batch=32, augment="shift", test_data="digits")


def wrong_classes_student():
    """A student factory with 7 outputs, for a 10-class teacher (imported by name in a test)."""
    from onnxopt.distill import digits_student

    return digits_student(width=0.25, num_classes=7)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The digits-cnn teacher exported, and the tiny task's data as an .npz."""
    import onnxopt
    from onnxopt.data.digits import load_digits_split

    d = tmp_path_factory.mktemp("distill")
    onnxopt.export("digits-cnn", d / "teacher.onnx")
    x, y, _, _ = load_digits_split()
    np.savez(d / "tiny.npz", input=x[:TINY], labels=y[:TINY])
    return d


@pytest.fixture(scope="module")
def one_proc(work):
    from onnxopt.distill import distill

    return distill(work / "teacher.onnx", work / "s1.onnx", data=str(work / "tiny.npz"),
                   cache_dir=work / "cache", **KW)


def _untrained_accuracy(width: float) -> float:
    from onnxopt.data.digits import load_digits_split
    from onnxopt.distill import build_student

    _, _, x, y = load_digits_split()
    net = build_student("digits-cnn", width, 10, seed=0).eval()
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_distillation_improves_over_the_untrained_student(one_proc, work):
    d = one_proc["distill"]
    assert d["samples"] == TINY and d["labelled"] == TINY and d["classes"] == 10
    assert d["params_counted"] == "ONNX initializers" and d["params_ratio"] < 0.1
    assert d["teacher_targets"] == "online (augmented views)"
    assert d["train_losses"][-1] < d["train_losses"][0]
    untrained = _untrained_accuracy(0.25)
    assert untrained < 0.2
    assert d["student_acc"] >= untrained + 0.3  # 3 epochs on 400 images, test split never seen
    assert d["teacher_acc"] > 0.99 and d["test_samples"] == 450
    assert one_proc["verification"]["passed"]  # export verified against the trained torch student
    assert [s["step"] for s in one_proc["steps"]] == ["distill", "export"]
    proto = onnx.load(work / "s1.onnx")
    assert [o.name for o in proto.graph.output] == ["logits"]


def test_interrupted_run_resumes_to_the_same_bytes(work, tmp_path):
    from onnxopt.distill import distill

    kw = dict(data=str(work / "tiny.npz"), width=0.25, epochs=2, batch=64, augment="none", cache_dir=work / "cache")
    whole = distill(work / "teacher.onnx", tmp_path / "a.onnx", checkpoint_dir=tmp_path / "ck_a", **kw)

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(work / "teacher.onnx", tmp_path / "b.onnx", checkpoint_dir=tmp_path / "ck_b", on_epoch_end=interrupt,
                **kw)
    assert (tmp_path / "ck_b" / "last.pt").is_file() and not (tmp_path / "b.onnx").exists()
    resumed = distill(work / "teacher.onnx", tmp_path / "b.onnx", checkpoint_dir=tmp_path / "ck_b", **kw)
    assert resumed["distill"]["resumed_from_epoch"] == 1 and whole["distill"]["resumed_from_epoch"] is None
    assert resumed["distill"]["train_losses"] == whole["distill"]["train_losses"]
    assert resumed["sha256"] == whole["sha256"]  # same weights, same bytes
    assert resumed["distill"]["teacher_targets"] == "cached"  # the teacher's targets were computed once
    # A checkpoint of other settings is refused, not silently mixed in.
    with pytest.raises(BadInput, match="was written by a run with other settings.*--no-resume"):
        distill(work / "teacher.onnx", tmp_path / "b.onnx", checkpoint_dir=tmp_path / "ck_b", **{**kw, "epochs": 3})


def test_two_processes_with_ddp_cover_the_data_and_converge_alike(work, one_proc):
    from onnxopt.distill import distill

    side = distill(work / "teacher.onnx", work / "s2.onnx", data=str(work / "tiny.npz"), nproc=2,
                   cache_dir=work / "cache", checkpoint_dir=work / "ck2", **KW)
    d, d1 = side["distill"], one_proc["distill"]
    assert d["nproc"] == 2 and d["backend"] == "gloo"
    cov = d["coverage"]
    assert cov["per_process"] == [TINY // 2, TINY // 2] and cov["distinct"] == TINY and cov["all_seen"]
    # Each step sees the same global batch as one process would (BatchNorm statistics are per
    # process, so the runs are close, not equal).
    assert abs(d["train_losses"][-1] - d1["train_losses"][-1]) < 0.1 * d1["train_losses"][-1]
    assert abs(d["student_acc"] - d1["student_acc"]) <= 0.1
    assert d["student_acc"] >= _untrained_accuracy(0.25) + 0.3
    assert side["verification"]["passed"]


def test_hint_loss_with_a_torch_teacher_and_unlabelled_data(work, tmp_path):
    from onnxopt.data.digits import load_digits_split
    from onnxopt.distill import distill

    x, y, _, _ = load_digits_split()
    np.savez(tmp_path / "few.npz", input=x[:64], labels=y[:64])
    np.savez(tmp_path / "more.npz", input=x[64:256])
    side = distill("digits-cnn", tmp_path / "h.onnx", data=str(tmp_path / "few.npz"),
                   unlabelled=str(tmp_path / "more.npz"), hint_weight=0.5, width=0.25, epochs=1, batch=64,
                   augment="none", test_data=None, cache_dir=work / "cache")
    d = side["distill"]
    assert d["samples"] == 256 and d["labelled"] == 64 and d["hint_weight"] == 0.5
    assert d["params_counted"] == "torch parameters" and d["student_params"] == 3778
    # The hint's projection (16 -> 64 features) is training-only: it is not in the exported student.
    dims = [tuple(i.dims) for i in onnx.load(tmp_path / "h.onnx").graph.initializer]
    assert (10, 16) in dims and (64, 16) not in dims and (16, 64) not in dims


def test_bad_inputs_are_one_line_errors(work, tmp_path, monkeypatch):
    from onnxopt.distill import distill

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    teacher = work / "teacher.onnx"
    x = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    with pytest.raises(BadInput, match=r"--student: outputs \[2, 7\] per batch, but the teacher scores 10 classes"):
        distill(teacher, tmp_path / "o.onnx", data=str(work / "tiny.npz"), student="test_distill:wrong_classes_student")
    with pytest.raises(BadInput, match="has 9 labels for 10 samples"):
        distill(teacher, tmp_path / "o.onnx", data=Dataset("d", {"input": x}, np.arange(9) % 2))
    with pytest.raises(BadInput, match=r"single class \(4\)"):
        distill(teacher, tmp_path / "o.onnx", data=Dataset("d", {"input": x}, np.full(10, 4)))
    with pytest.raises(BadInput, match="--alpha: 1 trains on labels alone"):
        distill(teacher, tmp_path / "o.onnx", data=Dataset("d", {"input": x}, None), alpha=1.0)
    with pytest.raises(BadInput, match="--batch: 63 is not divisible by --nproc 2"):
        distill(teacher, tmp_path / "o.onnx", batch=63, nproc=2)
    with pytest.raises(BadInput, match="--hint: no tensor named 'nope'"):
        distill(teacher, tmp_path / "o.onnx", data=Dataset("d", {"input": x}, np.arange(10) % 2), hint="nope",
                hint_weight=1.0)
    assert not (tmp_path / "o.onnx").exists()


def test_cli_distill_help_and_exit_code(work, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from onnxopt._cli_train import distill as distill_cmd
    from onnxopt.cli import _Group

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    group = _Group("onnxopt", commands={"distill": distill_cmd})
    r = CliRunner().invoke(group, ["distill", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.output and "--nproc" in r.output
    r = CliRunner().invoke(group, ["distill", str(work / "teacher.onnx"), "-o", str(tmp_path / "o.onnx"),
                                   "--data", str(work / "tiny.npz"), "--student", "test_distill:wrong_classes_student"])
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --student: outputs [2, 7]")


def test_an_unknown_option_is_bad_input_with_a_suggestion(work, tmp_path):
    from onnxopt.distill import DistillSettings, distill

    with pytest.raises(BadInput, match=r"^epoch: is not an option of distill; did you mean 'epochs'\?$"):
        distill(work / "teacher.onnx", tmp_path / "o.onnx", epoch=3)
    with pytest.raises(BadInput, match=r"^temprature: .*did you mean 'temperature'\?"):
        DistillSettings.from_options(temprature=3.0)
    with pytest.raises(BadInput, match=r"^zzzzzz: is not an option of distill; options: data, student, width"):
        DistillSettings.from_options(DistillSettings(), zzzzzz=1)
    assert not (tmp_path / "o.onnx").exists()


def test_distill_settings_validate_and_are_accepted_whole(work, tmp_path):
    import dataclasses

    from onnxopt.distill import DistillSettings, distill

    s = DistillSettings()
    assert s.epochs == 20 and s.width == 0.4 and s.augment == "none" and s.resume and s.cache
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.epochs = 3
    for kw, match in [(dict(alpha=2), r"--alpha: must be in \[0, 1\]"), (dict(temperature=0), "--temperature"),
                      (dict(hint_weight=-1), "--hint-weight"), (dict(epochs=0), "--epochs: must be >= 1"),
                      (dict(lr=0), "--lr: must be > 0"), (dict(width=0), "--width"),
                      (dict(batch=63, nproc=2), "--batch: 63 is not divisible by --nproc 2"),
                      (dict(augment="zzz"), "--augment: 'zzz' is not one of none, shift"),
                      (dict(student="nope"), "--student: 'nope' is neither"),
                      (dict(augment=lambda x, g: x, nproc=2), "--augment: a Python callable cannot be sent"),
                      (dict(on_epoch_end=print, nproc=2), "on_epoch_end: is called in this process only"),
                      (dict(device="tpu"), "--device: 'tpu' is not one of auto, cpu, cuda")]:
        with pytest.raises(BadInput, match=match):
            DistillSettings(**kw)
        with pytest.raises(BadInput, match=match):  # replacing fields checks them again
            DistillSettings.from_options(s, **kw)
    # settings= is what distill runs with; keywords given with it replace its fields.
    with pytest.raises(BadInput, match="--data: distillation needs training inputs"):
        distill(work / "teacher.onnx", tmp_path / "o.onnx", settings=DistillSettings(data=None))
    with pytest.raises(BadInput, match="--weights: only applies to a torch teacher"):
        distill(work / "teacher.onnx", tmp_path / "o.onnx", settings=DistillSettings(data=None), data="digits",
                weights="w.pt")
    with pytest.raises(BadInput, match="settings: dict is not a DistillSettings"):
        distill(work / "teacher.onnx", tmp_path / "o.onnx", settings={"epochs": 1})


def test_the_cli_options_are_the_settings_fields():
    import dataclasses

    import click

    from onnxopt._cli_train import distill as distill_cmd
    from onnxopt.distill import DistillSettings
    from onnxopt.options import flag_of

    params = {p.name: p for p in distill_cmd.params if isinstance(p, click.Option)}
    for f in dataclasses.fields(DistillSettings):
        assert f.metadata["help"] is not None
        if not f.metadata.get("cli", True):
            assert f.name not in params
            continue
        p = params[f.name]
        assert (p.help or "") == f.metadata["help"]
        assert p.opts == [flag_of(f)]
        if f.default is not None:
            assert p.default == f.default and p.show_default
    # A switch that is on by default keeps its --no-... spelling (and the API gets the field's value).
    assert params["resume"].secondary_opts == ["--no-resume"] and params["cache"].secondary_opts == ["--no-cache"]


def test_cli_switches_pass_the_settings_values(monkeypatch):
    from click.testing import CliRunner

    import onnxopt._cli_train as cli_train
    from onnxopt.options import fields_of

    got = {}
    monkeypatch.setattr(cli_train, "api_distill", lambda teacher, output, **o: got.update(o) or {"distill": {}})
    CliRunner().invoke(cli_train.distill, ["t.onnx", "-o", "o.onnx", "--json"])
    assert got["resume"] is True and got["cache"] is True and got["data"] == "digits"
    CliRunner().invoke(cli_train.distill, ["t.onnx", "-o", "o.onnx", "--no-resume", "--no-cache", "--json"])
    assert got["resume"] is False and got["cache"] is False
    assert set(got) == {n for n, f in fields_of(cli_train.DistillSettings).items() if f.metadata["cli"]}
    monkeypatch.setattr(cli_train, "api_head", lambda model, output, **o: got.update(o) or {"head": {}})
    r = CliRunner().invoke(cli_train.head, ["m.onnx", "-o", "o.onnx", "--json"])
    assert r.exit_code == 2 and "Missing option '--data'" in r.output
    CliRunner().invoke(cli_train.head, ["m.onnx", "-o", "o.onnx", "--data", "digits", "--json"])
    assert got["refit"] is True and got["softmax"] is None and got["cache"] is True
    CliRunner().invoke(cli_train.head, ["m.onnx", "-o", "o.onnx", "--data", "digits", "--no-refit", "--logits",
                                        "--no-cache", "--json"])
    assert got["refit"] is False and got["softmax"] is False and got["cache"] is False


def test_the_worker_does_not_import_the_job():
    """No import cycle: the training loop and the models it shares with the job do not import
    :mod:`onnxopt.distill` (checked under a bare ``onnxopt`` package, as ``onnxopt/__init__``
    itself imports the job)."""
    import subprocess
    import sys
    from pathlib import Path

    pkg = Path(__file__).resolve().parent.parent / "onnxopt"
    code = ("import sys, types; pkg = types.ModuleType('onnxopt'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['onnxopt'] = pkg\n"
            "import onnxopt.distill_models\n"
            "print(sorted(m for m in ('torch', 'onnxopt.distill', 'onnxopt._distill_worker') if m in sys.modules))\n"
            "import onnxopt._distill_worker\n"
            "print(sorted(m for m in ('onnxopt.distill', 'onnxopt.head') if m in sys.modules))\n"
            "import onnxopt.distill\n"
            "print(onnxopt.distill.build_student is onnxopt._distill_worker.build_student)\n")
    out = subprocess.run([sys.executable, "-c", code, str(pkg)], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["[]", "[]", "True"], out.stdout + out.stderr
    code = ("import sys, types; pkg = types.ModuleType('onnxopt'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['onnxopt'] = pkg\n"
            "import onnxopt.distill\n"
            "print(sorted(m for m in ('torch', 'onnxopt._distill_worker') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, str(pkg)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_two_machines_meet_at_a_rendezvous_like_two_local_processes(work, tmp_path):
    """The multi-node command line (--nnodes 2 --node-rank R --master HOST:PORT), both nodes on
    this machine: the same DDP world as --nproc 2, so the same training and the same student."""
    import json
    import socket
    import subprocess

    from test_cli import run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--data", work / "tiny.npz", "--width", "0.25", "--epochs", "3", "--batch", "32", "--augment", "shift",
              "--test-data", "digits", "--cache-dir", work / "cache", "--json"]
    env_cmd = [sys.executable, "-m", "onnxopt.cli", "distill", str(work / "teacher.onnx")]
    from test_cli import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT), ONNXOPT_NO_PROGRESS="1")
    node1 = subprocess.Popen(env_cmd + ["-o", str(tmp_path / "n1.onnx"), "--nnodes", "2", "--node-rank", "1",
                                        "--master", f"127.0.0.1:{port}", "--checkpoint-dir", str(tmp_path / "ck1"),
                                        *map(str, common)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    node0 = run_cli("distill", work / "teacher.onnx", "-o", tmp_path / "n0.onnx", "--nnodes", "2", "--node-rank", "0",
                    "--master", f"127.0.0.1:{port}", "--checkpoint-dir", tmp_path / "ck0", *common)
    out1, err1 = node1.communicate(timeout=600)
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, err1[-3000:]
    assert json.loads(out1)["output"] is None and not (tmp_path / "n1.onnx").exists()  # node 0 writes
    d = json.loads(node0.stdout)["distill"]
    assert d["nnodes"] == 2 and d["coverage"]["per_process"] == [TINY // 2, TINY // 2]
    local = run_cli("distill", work / "teacher.onnx", "-o", tmp_path / "p2.onnx", "--nproc", "2",
                    "--checkpoint-dir", tmp_path / "ckp", *common)
    assert local.returncode == 0, local.stderr[-3000:]
    assert json.loads(local.stdout)["distill"]["train_losses"] == d["train_losses"]
    assert (tmp_path / "p2.onnx").read_bytes() == (tmp_path / "n0.onnx").read_bytes()


def test_multi_machine_options_are_checked():
    from onnxopt.distill import DistillSettings

    with pytest.raises(BadInput, match="--master: is needed"):
        DistillSettings(nnodes=2)
    with pytest.raises(BadInput, match="--node-rank: must be in 0..1"):
        DistillSettings(nnodes=2, node_rank=2, master="h:1")
    with pytest.raises(BadInput, match="--master: 'h' is not HOST:PORT"):
        DistillSettings(nnodes=2, master="h")
    with pytest.raises(BadInput, match="not divisible by 4 processes"):
        DistillSettings(nnodes=2, nproc=2, batch=6, master="h:1")
