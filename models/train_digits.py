"""Train the built-in ``digits-cnn`` and save its weights to ``models/digits_cnn.pt``.

Deterministic: fixed seeds, deterministic algorithms, one CPU thread, a fixed data order per
epoch drawn from a seeded generator. Running it again on the same torch version writes the same
bytes. Takes well under a minute on one CPU core.

    python models/train_digits.py                     # train, report accuracy, save digits_cnn.pt
    python models/train_digits.py --check             # train and compare with the saved file, save nothing
    python models/train_digits.py --seed 1            # same recipe, another seed: digits_cnn_seed1.pt
    python models/train_digits.py --seed 1 --holdout  # without the validation quarter: ..._seed1_holdout.pt

``--seed`` changes only the seed (weight initialisation, data order, augmentation shifts); seed 0
is the built-in model; seeds 0-2 are the members of the ensemble benchmark
(``benchmarks/ensemble.py``). ``--holdout`` leaves out the train-split images that
``onnxopt.ensemble`` fits ensemble weights and cascade thresholds on. :func:`train` also takes a starting ``state`` and an epoch count,
for fine-tuning copies of one model (the benchmark's model soups).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a source checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from onnxopt.artifact import atomic_write_bytes  # noqa: E402
from onnxopt.data.digits import load_digits_split  # noqa: E402
from onnxopt.zoo.digits_cnn import DigitsCNN  # noqa: E402

SEED = 0
EPOCHS = 40
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(seed: int = SEED, *, state: dict | None = None, epochs: int = EPOCHS, lr: float = LR,
          holdout: bool = False, classes: int = 10, verbose: bool = True) -> tuple[dict, float, float]:
    """Train (or, from ``state``, fine-tune) a DigitsCNN; returns (state_dict, train acc, test acc).
    ``holdout``: leave out the validation quarter of the train split (the images
    ``onnxopt.ensemble.digits_validation()`` returns). ``classes``: train and test on the images of
    digits 0 .. classes-1 only, with that many outputs (``models/train_digits04.py``: 5). The
    defaults are the recipe of the built-in model's weights."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    x_train, y_train, x_test, y_test = load_digits_split()
    if holdout:
        from onnxopt.ensemble import digits_validation_indices

        keep = np.setdiff1d(np.arange(len(x_train)), digits_validation_indices(len(x_train)))
        x_train, y_train = x_train[keep], y_train[keep]
    if classes < 10:
        x_train, y_train = x_train[y_train < classes], y_train[y_train < classes]
        x_test, y_test = x_test[y_test < classes], y_test[y_test < classes]
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test))
    model = DigitsCNN(num_classes=classes)
    if state is not None:
        model.load_state_dict(state)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    steps = epochs * ((len(x_train) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)

    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            xb = x_train[idx]
            # Augmentation: shift each image by up to one pixel (zero fill), deterministic.
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
            loss = loss_fn(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose and (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  test acc {accuracy(model, x_test, y_test):.4f}",
                  file=sys.stderr)

    model.eval()
    train_acc = accuracy(model, x_train, y_train)
    test_acc = accuracy(model, x_test, y_test)
    # Contiguous, detached float tensors only: torch.save of equal tensors gives equal bytes.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return state, train_acc, test_acc


def serialize(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED,
                        help="random seed (0: the built-in model's weights)")
    parser.add_argument("--holdout", action="store_true", help="train without the validation quarter of the "
                        "train split (onnxopt.ensemble.digits_validation), for fitting ensembles on unseen data")
    parser.add_argument("--out", type=Path, help="where to save [default: digits_cnn.pt for seed 0, "
                        "digits_cnn_seed<N>.pt otherwise, in this folder; _holdout before .pt with --holdout]")
    parser.add_argument("--check", action="store_true", help="compare with the saved file; write nothing")
    args = parser.parse_args()
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if args.out is None:
        stem = "digits_cnn" if args.seed == SEED and not args.holdout else f"digits_cnn_seed{args.seed}"
        args.out = HERE / (stem + ("_holdout" if args.holdout else "") + ".pt")

    start = time.perf_counter()
    state, train_acc, test_acc = train(args.seed, holdout=args.holdout)
    print(f"train acc {train_acc:.4f}  test acc {test_acc:.4f}  ({time.perf_counter() - start:.1f} s)")
    return save_or_check(state, args.out, args.check)


def save_or_check(state: dict, out: Path, check: bool) -> int:
    """Write ``state`` to ``out`` (atomically), or with ``check`` compare its bytes with the file
    there and write nothing. Returns the exit code: 1 when a check finds different bytes."""
    data = serialize(state)
    digest = hashlib.sha256(data).hexdigest()
    print(f"sha256 {digest}  {len(data)} bytes")
    if check:
        same = out.exists() and hashlib.sha256(out.read_bytes()).hexdigest() == digest
        print("same bytes as " + str(out) if same else "DIFFERS from " + str(out))
        return 0 if same else 1
    atomic_write_bytes(out, data)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
