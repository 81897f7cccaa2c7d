"""Train a digits backbone on classes 0-4 only, for the head-replacement check (0-4 -> 5-9).

The architecture is the built-in ``DigitsCNN`` with a 5-class classifier, trained by
``models/train_digits.py``'s ``train(classes=5)`` (same seed, schedule, one-pixel shift
augmentation, deterministic algorithms, one thread) on the train-split images of digits 0-4 only;
the images of 5-9 are never seen. Saved to ``models/digits04_cnn.pt``. ``digits04_cnn()`` is a factory that loads it:

    python models/train_digits04.py            # train, report accuracy, save
    python models/train_digits04.py --check    # train and compare with the saved file, save nothing
    onnxopt export models.train_digits04:digits04_cnn --input-shape 1x1x8x8 -o digits04.onnx
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # run from a source checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402

SEED = 0
CLASSES = (0, 1, 2, 3, 4)
WEIGHTS = "digits04_cnn.pt"


def digits04_cnn() -> nn.Module:
    """The trained 0-4 backbone (a ``DigitsCNN`` with 5 outputs), eval mode."""
    from onnxopt.zoo import find_weights
    from onnxopt.zoo.digits_cnn import DigitsCNN

    model = DigitsCNN(num_classes=len(CLASSES))
    model.load_state_dict(torch.load(find_weights(WEIGHTS), map_location="cpu", weights_only=True))
    return model.eval()


def train() -> tuple[dict, float]:
    from models.train_digits import train as train_digits

    state, _, test_acc = train_digits(SEED, classes=len(CLASSES), verbose=False)
    return state, test_acc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / WEIGHTS)
    parser.add_argument("--check", action="store_true", help="compare with the saved file; write nothing")
    args = parser.parse_args()
    from models.train_digits import save_or_check

    start = time.perf_counter()
    state, test_acc = train()
    print(f"test acc (0-4) {test_acc:.4f}  ({time.perf_counter() - start:.1f} s)")
    return save_or_check(state, args.out, args.check)


if __name__ == "__main__":
    sys.exit(main())
