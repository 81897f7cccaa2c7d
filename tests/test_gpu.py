"""CUDA execution provider: runs where onnxruntime-gpu and a GPU are present, skips otherwise."""

import pytest

from onnxopt.bench import BenchSettings, bench
from onnxopt.runtime import available_providers

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif("cuda" not in available_providers(), reason="no CUDAExecutionProvider here")]


def test_bench_on_cuda_and_cpu_side_by_side(mlp_path, mlp2_path):
    rep = bench([mlp_path, mlp2_path], settings=BenchSettings(providers=("auto",), threads=(1,), duration=0.3,
                                                             warmup=2, min_rounds=3, memory=False))
    assert {r["provider"] for r in rep["rows"]} == {"cpu", "cuda"}
    cuda = [r for r in rep["rows"] if r["provider"] == "cuda" and r["model"] == "mlp_wide"]
    assert cuda and cuda[0]["agreement"]["shape_ok"]
