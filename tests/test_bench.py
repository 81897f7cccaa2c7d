import json
import shutil

import numpy as np
import onnx
from click.testing import CliRunner
from conftest import make_mlp

from onnxopt import bench
from onnxopt.bench import BenchSettings
from onnxopt.cli import main
from onnxopt.report import bench_markdown, bench_table

FAST = BenchSettings(batches=(1, 4), threads=(1,), duration=0.2, warmup=1, min_rounds=3, memory=True)
ROW_FIELDS = {"model", "provider", "threads", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput",
              "runs", "speedup", "size_bytes", "size_gz_bytes", "load_ms", "peak_mem_mb"}


def test_bench_two_models_side_by_side(mlp_path, mlp2_path):
    rep = bench([mlp_path, mlp2_path], settings=FAST)
    rows = rep["rows"]
    assert len(rows) == 4  # 2 models x 2 batch sizes, CPU only here
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["runs"] >= 3
        assert r["size_gz_bytes"] < r["size_bytes"] + 64
    ref = [r for r in rows if r["model"] == "mlp"]
    assert all(r["speedup"] == 1.0 for r in ref)
    other = [r for r in rows if r["model"] == "mlp_wide"]
    # same seed, different width: outputs differ, so agreement is measured and not perfect
    assert all(r["agreement"]["max_abs_err"] > 0 for r in other)
    assert rows[0]["throughput"] > 0
    table = bench_table(rep)
    assert "mlp_wide" in table and "p50 ms" in table and "speedup" in table
    md = bench_markdown(rep)
    assert md.count("| mlp") == 4


def test_bench_copy_of_itself_agrees_exactly(tmp_path, mlp_path):
    copy = tmp_path / "copy" / "mlp.onnx"
    copy.parent.mkdir()
    shutil.copy(mlp_path, copy)
    rep = bench([mlp_path, copy], settings=BenchSettings(threads=(1,), duration=0.2, warmup=1, min_rounds=3,
                                                          memory=False))
    names = [r["model"] for r in rep["rows"]]
    assert len(set(names)) == 2  # same stem in two folders gets distinct names
    assert rep["rows"][1]["agreement"]["max_abs_err"] == 0.0


def test_bench_accuracy_with_npz(tmp_path, mlp_path):
    x = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    import onnxruntime as ort

    y = ort.InferenceSession(str(mlp_path)).run(None, {"x": x})[0].argmax(1)
    labels = y.copy()
    labels[:5] = (labels[:5] + 1) % 4  # 15 of 20 right
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    rep = bench([mlp_path], settings=BenchSettings(threads=(1,), duration=0.1, warmup=0, min_rounds=2,
                                                    memory=False), data=str(tmp_path / "d.npz"))
    assert rep["rows"][0]["accuracy"] == 0.75


def test_bench_cli_json_and_markdown(tmp_path, mlp_path, mlp2_path):
    md = tmp_path / "r.md"
    res = CliRunner().invoke(main, ["bench", str(mlp_path), str(mlp2_path), "--duration", "0.2", "--warmup", "1",
                                    "--threads", "1", "--no-memory", "--json", "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["reference"] == "mlp" and len(rep["rows"]) == 2
    assert rep["machine"]["cores"] >= 1 and "onnxruntime" in rep["machine"]
    assert md.read_text().startswith("# Benchmark")


def test_bench_rejects_models_with_different_inputs(tmp_path, mlp_path):
    from conftest import make_embedding

    p = tmp_path / "emb.onnx"
    onnx.save(make_embedding(), p)
    res = CliRunner().invoke(main, ["bench", str(mlp_path), str(p), "--duration", "0.1"])
    assert res.exit_code == 2 and "same inputs" in res.stderr


def test_bench_fixed_batch_model_at_other_batch(tmp_path):
    p = tmp_path / "fixed.onnx"
    onnx.save(make_mlp(0, batch_dim=1), p)
    res = CliRunner().invoke(main, ["bench", str(p), "--batch", "4", "--duration", "0.1"])
    assert res.exit_code == 2 and "fixed batch" in res.stderr


def test_agreement_metric_follows_the_sidecar_task(tmp_path):
    from onnxopt.artifact import save_model

    settings = BenchSettings(threads=(1,), duration=0.1, warmup=0, min_rounds=2, memory=False)
    for task, has_top1 in (("embedding", False), ("classification", True)):
        a, b = tmp_path / task / "a.onnx", tmp_path / task / "b.onnx"
        save_model(make_mlp(0), a, {"task": task})
        save_model(make_mlp(1), b, {"task": task})
        rep = bench([a, b], settings=settings)
        assert rep["task"] == task
        assert ("top1_agreement" in rep["rows"][1]["agreement"]) is has_top1
