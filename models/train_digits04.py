"""Train a digits backbone on classes 0-4 only, for the head-replacement check (0-4 -> 5-9).

The architecture is the built-in ``DigitsCNN`` with a 5-class classifier, trained like
``models/train_digits.py`` (same seed, schedule, one-pixel shift augmentation, deterministic
algorithms, one thread) on the train-split images of digits 0-4 only; the images of 5-9 are never
seen. Saved to ``models/digits04_cnn.pt``. ``digits04_cnn()`` is a factory that loads it:

    python models/train_digits04.py            # train, report accuracy, save
    python models/train_digits04.py --check    # train and compare with the saved file, save nothing
    onnxopt export models.train_digits04:digits04_cnn --input-shape 1x1x8x8 -o digits04.onnx
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # run from a source checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402

SEED = 0
EPOCHS = 40
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4
CLASSES = (0, 1, 2, 3, 4)
WEIGHTS = "digits04_cnn.pt"


def digits04_cnn() -> nn.Module:
    """The trained 0-4 backbone (a ``DigitsCNN`` with 5 outputs), eval mode."""
    from onnxopt.zoo import find_weights
    from onnxopt.zoo.digits_cnn import DigitsCNN

    model = DigitsCNN(num_classes=len(CLASSES))
    model.load_state_dict(torch.load(find_weights(WEIGHTS), map_location="cpu", weights_only=True))
    return model.eval()


def _shift(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift the batch by up to one pixel (zero fill), as models/train_digits.py does."""
    shifts = torch.randint(-1, 2, (2,), generator=gen).tolist()
    xb = torch.roll(xb, shifts=shifts, dims=(2, 3))
    if shifts[0] == 1:
        xb[:, :, 0, :] = 0
    elif shifts[0] == -1:
        xb[:, :, -1, :] = 0
    if shifts[1] == 1:
        xb[:, :, :, 0] = 0
    elif shifts[1] == -1:
        xb[:, :, :, -1] = 0
    return xb


def train() -> tuple[dict, float]:
    from onnxopt.data.digits import load_digits_split
    from onnxopt.zoo.digits_cnn import DigitsCNN

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in load_digits_split())
    keep, keep_t = y_train < len(CLASSES), y_test < len(CLASSES)
    x_train, y_train, x_test, y_test = x_train[keep], y_train[keep], x_test[keep_t], y_test[keep_t]
    model = DigitsCNN(num_classes=len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * ((len(x_train) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            loss = nn.functional.cross_entropy(model(_shift(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"{len(x_train)} training images of digits 0-4; test accuracy on 0-4 ({len(x_test)} images) "
          f"{test_acc:.4f}", file=sys.stderr)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, test_acc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / WEIGHTS)
    parser.add_argument("--check", action="store_true", help="compare with the saved file; write nothing")
    args = parser.parse_args()
    from onnxopt.artifact import atomic_write_bytes

    start = time.perf_counter()
    state, test_acc = train()
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    print(f"test acc (0-4) {test_acc:.4f}  ({time.perf_counter() - start:.1f} s)")
    print(f"sha256 {digest}  {len(data)} bytes")
    if args.check:
        same = args.out.exists() and hashlib.sha256(args.out.read_bytes()).hexdigest() == digest
        print("same bytes as " + str(args.out) if same else "DIFFERS from " + str(args.out))
        return 0 if same else 1
    atomic_write_bytes(args.out, data)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
