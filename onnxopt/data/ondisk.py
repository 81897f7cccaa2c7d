"""Arrays that live in files (``np.memmap``): giving their pages back once used, so a dataset
bigger than memory streams through a job a batch at a time. numpy only: imported by
:mod:`onnxopt.feeds` and :mod:`onnxopt.data.images` alike."""

from __future__ import annotations

import numpy as np

__all__ = ["release_pages", "in_slices"]


def release_pages(arr: np.ndarray, start: int, stop: int) -> None:
    """Give back the memory pages of ``arr[start:stop]`` when ``arr`` is a read-only view of a
    file on disk (``np.memmap``): they are read again from the file if touched. Streaming a
    dataset bigger than memory through a job then never holds more than a batch of it."""
    import mmap

    root = arr
    while isinstance(root.base, np.ndarray):
        root = root.base
    if (not isinstance(root.base, mmap.mmap) or not isinstance(root, np.memmap) or not arr.flags.c_contiguous
            or arr.ndim == 0 or not len(arr)):
        return
    row = arr[0].nbytes
    # np.memmap maps from the allocation granule below its offset: element 0 sits that far in
    origin = (arr.__array_interface__["data"][0] - root.__array_interface__["data"][0]
              + root.offset % mmap.ALLOCATIONGRANULARITY)
    lo, hi = origin + start * row, origin + min(stop, len(arr)) * row
    page = mmap.PAGESIZE
    lo, hi = -(-lo // page) * page, hi // page * page  # whole pages inside the range only
    if hi > lo:
        try:
            root.base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError, AttributeError):  # not Linux, or a mapping that refuses it
            pass


def in_slices(arr: np.ndarray, chunk_bytes: int = 16 << 20):
    """``arr`` in slices along axis 0 of about ``chunk_bytes`` each, the pages of each given back
    (:func:`release_pages`) once the caller asks for the next: a whole-array reduction without a
    temporary the size of the data, and a dataset on disk read a slice at a time."""
    step = max(1, chunk_bytes // max(1, arr[0].nbytes))
    for i in range(0, len(arr), step):
        yield arr[i:i + step]
        release_pages(arr, i, i + step)
