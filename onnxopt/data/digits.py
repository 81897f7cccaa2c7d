"""scikit-learn's bundled digits data set (1797 8x8 grey images, 10 classes), split once.

The split is fixed (stratified, 25 % test, ``random_state=0``), so every command and test sees
the same 1347 training and 450 test images.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["load_digits_split", "TEST_SIZE", "SPLIT_SEED"]

TEST_SIZE = 0.25
SPLIT_SEED = 0


@functools.lru_cache(maxsize=None)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    # Pixel values are 0..16; scale to [0, 1] and add the channel axis: (N, 1, 8, 8).
    images = (data.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    labels = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=labels
    )
    arrays = (x_train, y_train, x_test, y_test)
    for a in arrays:
        a.setflags(write=False)  # cached: callers get copies, never a shared mutable array
    return arrays


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)``.

    Images are float32 of shape ``(N, 1, 8, 8)`` in ``[0, 1]``; labels are int64 in ``0..9``.
    The split itself never changes; ``seed`` only shuffles the order of the *training* set
    (``seed=0`` keeps scikit-learn's split order), so the test set is always the same 450 images
    in the same order.
    """
    x_train, y_train, x_test, y_test = _split()
    x_train, y_train = x_train.copy(), y_train.copy()
    if seed:
        order = np.random.default_rng(seed).permutation(len(x_train))
        x_train, y_train = x_train[order], y_train[order]
    return x_train, y_train, x_test.copy(), y_test.copy()
