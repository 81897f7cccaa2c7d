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
    with pytest.raises(BadInput, match="different lengths"):
        load_dataset(str(p), make_mlp(0))
    with pytest.raises(BadInput, match="unknown dataset"):
        load_dataset("imagenet")


def test_digits_dataset():
    ds = load_dataset("digits")
    assert ds.inputs["input"].shape[1:] == (1, 8, 8) and len(ds) == len(ds.labels) > 100
