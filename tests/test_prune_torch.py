"""Pruning with fine-tuning when the source is a torch model (Torch-Pruning, then export + verify)."""

from __future__ import annotations

import onnx
import pytest

from onnxopt.errors import BadInput

pytest.importorskip("torch")
pytest.importorskip("torch_pruning")


def test_digits_prune_finetune_export(tmp_path):
    from onnxopt.evaluate import evaluate
    from onnxopt.feeds import load_dataset
    from onnxopt.prune_torch import prune_finetune

    out = tmp_path / "d.onnx"
    side = prune_finetune("digits-cnn", out, amount=0.5, epochs=2, data="digits")
    step = side["steps"][0]
    assert [s["step"] for s in side["steps"]] == ["prune-finetune", "export"]
    assert step["params_ratio"] <= 0.3 and step["training_data"] == "digits (train split)"
    assert step["train_losses"][-1] < step["train_losses"][0]
    assert side["verification"]["passed"]  # the export matches the pruned torch network
    proto = onnx.load(out)
    widths = sorted({int(i.dims[0]) for i in proto.graph.initializer if len(i.dims) == 4})
    assert max(widths) == 32  # 64-channel convs are now 32 wide
    acc = evaluate(proto, load_dataset("digits", proto))["accuracy"]
    assert acc >= 0.95  # test split, never seen in training


@pytest.mark.parametrize("kwargs, flag", [({"amount": 1.0}, "--amount"), ({"amount": 0}, "--amount"),
                                          ({"epochs": -1}, "--finetune-epochs"),
                                          ({"importance": "taylor"}, "--importance")])
def test_bad_options(tmp_path, kwargs, flag):
    from onnxopt.prune_torch import prune_finetune

    with pytest.raises(BadInput, match=flag):
        prune_finetune("digits-cnn", tmp_path / "x.onnx", **kwargs)
    assert not (tmp_path / "x.onnx").exists()


def test_needs_labelled_data(tmp_path):
    import numpy as np

    from onnxopt.prune_torch import prune_finetune

    np.savez(tmp_path / "u.npz", x=np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(BadInput, match="has no labels"):
        prune_finetune("digits-cnn", tmp_path / "x.onnx", data=str(tmp_path / "u.npz"))
