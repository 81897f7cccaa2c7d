"""Data bigger than memory: image folders decoded to disk and read a batch at a time, pages given
back, calibration copying only the samples it uses (issue: bounded memory, calibration streams)."""

import mmap
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.feeds import Dataset, all_finite, release_pages


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


@linux_only
def test_release_pages_gives_back_a_memmaps_pages_and_keeps_its_data(tmp_path):
    # an offset that is not a multiple of the allocation granule: np.memmap maps from below it
    offset = mmap.ALLOCATIONGRANULARITY + 4 * 96
    shape = (256, 64 * 1024)  # 64 MB of float32
    path = tmp_path / "x.f32"
    w = np.memmap(path, np.float32, "w+", shape=shape, offset=offset)
    w[:] = np.arange(shape[0], dtype=np.float32)[:, None]
    w.flush()
    del w
    x = np.memmap(path, np.float32, "r", shape=shape, offset=offset)
    before = _rss_file_kb()
    assert float(x.sum(dtype=np.float64)) == pytest.approx(shape[1] * shape[0] * (shape[0] - 1) / 2)
    touched = _rss_file_kb()
    assert touched - before > 50_000  # the whole file was read through the mapping
    view = x[10:250]
    release_pages(view, 0, len(view))  # a view: its offsets are relative to the view
    released = _rss_file_kb()
    assert touched - released > 45_000
    np.testing.assert_array_equal(view[:, 0], np.arange(10, 250, dtype=np.float32))  # read again from the file
    np.testing.assert_array_equal(x[:10, 7], np.arange(10, dtype=np.float32))


def test_release_pages_leaves_ordinary_arrays_alone():
    a = np.ones((4, 1000), np.float32)
    release_pages(a, 0, 4)
    assert a.sum() == 4000


def test_all_finite_in_slices_finds_a_nan_anywhere():
    a = np.zeros((300, 20_000), np.float32)  # 24 MB: checked in slices
    assert all_finite(a, chunk_bytes=1 << 20)
    a[299, 5] = np.nan
    assert not all_finite(a, chunk_bytes=1 << 20)
    assert not all_finite(np.array(np.inf, np.float32))


@linux_only
def test_dataset_batches_over_a_memmap_hold_one_batch(tmp_path):
    shape = (512, 32 * 1024)  # 64 MB
    path = tmp_path / "d.f32"
    w = np.memmap(path, np.float32, "w+", shape=shape)
    w[:] = 1.0
    w.flush()
    del w
    ds = Dataset("disk", {"x": np.memmap(path, np.float32, "r", shape=shape)})
    before, peak, total = _rss_file_kb(), 0, 0.0
    for feeds, _ in ds.batches(32):
        total += float(feeds["x"].sum())
        peak = max(peak, _rss_file_kb() - before)
    assert total == np.prod(shape)
    assert peak < 16_000  # a batch is 4 MB; without giving pages back this reaches 64 MB


def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.3, (4, 5)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["img", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "fc"], ["logits"], name="fc")]
    g = helper.make_graph(nodes, "tiny_conv", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], [w, fc])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _image_folder(root, n: int):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_folder_over_the_threshold_is_decoded_to_disk_once(tmp_path, monkeypatch):
    from onnxopt.data import images

    folder = _image_folder(tmp_path / "imgs", 30)
    in_memory, labels, classes = images.load_image_folder(folder, (1, 3, 16, 16))
    assert not isinstance(in_memory, np.memmap)
    monkeypatch.setattr(images, "ON_DISK_FROM", 1)
    on_disk, labels2, classes2 = images.load_image_folder(folder, (1, 3, 16, 16), cache_dir=tmp_path / "cache")
    assert isinstance(on_disk, np.memmap) and on_disk.mode == "r"
    np.testing.assert_array_equal(on_disk, in_memory)
    np.testing.assert_array_equal(labels2, labels)
    assert classes2 == classes == ["a", "b"]
    files = list((tmp_path / "cache" / "images").iterdir())
    assert len(files) == 1 and files[0].name.endswith("-30x3x16x16.f32")  # no temp file left behind

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images, "_decode", no_decoding)
    again, _, _ = images.load_image_folder(folder, (1, 3, 16, 16), cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again, in_memory)
    with pytest.raises(AssertionError, match="decoded again"):  # another preprocessing is another file
        images.load_image_folder(folder, (1, 3, 16, 16), preprocess="unit", cache_dir=tmp_path / "cache")


def test_calibration_copies_only_the_samples_it_uses():
    from onnxopt.passes.quantize import CalibrationFeeds

    model = _conv_model()
    rng = np.random.default_rng(0)
    feeds = [{"img": rng.normal(size=(32, 3, 16, 16)).astype(np.float32)} for _ in range(10)]
    reader = CalibrationFeeds(feeds, model, samples=40)
    assert len(reader) == 40 and reader.arrays["img"].shape[0] == 40  # not the 320 given
    np.testing.assert_array_equal(reader.arrays["img"][32:40], feeds[1]["img"][:8])
    assert np.shares_memory(reader.get_next()["img"], reader.arrays["img"])


def test_static_quantize_calibrates_on_an_image_folder_read_from_disk(tmp_path, monkeypatch):
    from onnxopt.data import images
    from onnxopt.quantize import quantize

    monkeypatch.setattr(images, "ON_DISK_FROM", 1)
    monkeypatch.setenv("ONNXOPT_CACHE_DIR", str(tmp_path / "cache"))
    folder = _image_folder(tmp_path / "imgs", 40)
    src = tmp_path / "conv.onnx"
    onnx.save(_conv_model(), src)
    side = quantize(src, tmp_path / "q.onnx", mode="static", data=str(folder), preprocess="unit",
                    speed_check=False, max_channel_error=100, min_agreement=0.0)
    assert (tmp_path / "q.onnx").exists()
    assert side["verification"]["verified"] is True
    assert any(c["case"].startswith("imgs") for c in side["verification"]["cases"])
    assert list((tmp_path / "cache" / "images").glob("*.f32"))  # the images came from the file on disk
