"""Channel pruning with fine-tuning when the source is a torch model: prune, train again, export.

This is the seed's route (prune, then train again) for users who have the PyTorch source and
labelled training data. The pruning itself is Torch-Pruning's (``torch_pruning``: dependency graph,
group importance, ``MetaPruner``); onnxopt adds the data plumbing, a deterministic fine-tuning
loop, and the export + verification of the pruned network, with the steps in the sidecar's lineage.
For a bare ``.onnx`` file, :mod:`onnxopt.passes.prune` prunes the graph itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from .errors import BadInput, MissingDependency
from .feeds import Dataset
from .progress import progress
from .sources import last_linear, require_torch, resolve

__all__ = ["prune_finetune", "IMPORTANCE"]

logger = logging.getLogger(__name__)

IMPORTANCE = ("l1", "l2")


def _training_data(data, spec) -> Dataset:
    """Labelled training data: ``digits`` means its train split (the test split stays unseen)."""
    from .head import labelled_data

    data = data if data is not None else spec.dataset
    if data is None:
        raise BadInput("--data", "fine-tuning needs labelled training data", "pass --data digits or an .npz "
                       "with the model's input and labels")
    return labelled_data(data, "--data", split="train", input_names=[i.name for i in spec.inputs])


def prune_finetune(model: str, output: str | Path, *, amount: float = 0.5, epochs: int = 2,
                   data: str | None = None, importance: str = "l1", lr: float = 1e-3, batch: int = 64,
                   round_to: int | None = None, seed: int = 0, weights: str | None = None,
                   input_shape: str | None = None, opset: int | None = None) -> dict:
    """Prune ``amount`` of the channels of a built-in model or factory with Torch-Pruning, fine-tune
    it for ``epochs`` on labelled ``data``, export it to ``output`` and verify the export against
    the pruned torch network. Returns the output's sidecar (``steps``: prune-finetune, export).
    """
    if not 0 < float(amount) < 1:
        raise BadInput("--amount", f"{amount} is outside (0, 1)")
    if int(epochs) < 0:
        raise BadInput("--finetune-epochs", "must be >= 0")
    if importance not in IMPORTANCE:
        raise BadInput("--importance", f"'{importance}' is not one of {', '.join(IMPORTANCE)} for torch pruning")
    torch = require_torch(model)
    try:
        import torch_pruning as tp
    except ImportError:
        raise MissingDependency(model, "torch-pruning", "torch") from None
    from .export import export_spec

    spec = resolve(model, input_shape=input_shape, weights=weights)
    train = _training_data(data, spec)
    torch.manual_seed(seed)
    net = spec.build()
    example = {k: torch.from_numpy(v) for k, v in spec.sample_inputs(1, None, seed=0).items()}
    params_before = sum(p.numel() for p in net.parameters())
    head = last_linear(torch, net)
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        net, tuple(example.values()) if len(example) > 1 else next(iter(example.values())),
        importance=tp.importance.GroupMagnitudeImportance(p=1 if importance == "l1" else 2),
        pruning_ratio=float(amount), ignored_layers=[head] if head is not None else [],
        round_to=round_to)
    pruner.step()
    params_after = sum(p.numel() for p in net.parameters())
    prune_s = time.perf_counter() - t0

    names = [i.name for i in spec.inputs]
    x = {k: torch.from_numpy(np.ascontiguousarray(train.inputs[k])) for k in names}
    y = torch.from_numpy(train.labels.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    t0 = time.perf_counter()
    bar = progress(total=int(epochs), desc="fine-tune", unit="epoch")
    for _ in range(int(epochs)):
        net.train()
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            out = net(*(x[k][idx] for k in names))
            loss = torch.nn.functional.cross_entropy(out, y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(round(total / len(y), 5))
        bar.update(1)
    bar.close()
    net.eval()
    train_s = time.perf_counter() - t0
    pruned = dataclasses.replace(spec, build=lambda: net, summary=f"{spec.summary} (pruned {amount:.0%})")
    from importlib.metadata import version

    step = {"step": "prune-finetune", "library": f"torch-pruning {version('torch-pruning')}",
            "amount": float(amount), "importance": importance, "round_to": round_to, "epochs": int(epochs),
            "lr": lr, "batch": batch, "seed": seed, "training_data": train.name, "train_losses": losses,
            "params_before": int(params_before), "params_after": int(params_after),
            "params_ratio": round(params_after / params_before, 4), "prune_seconds": round(prune_s, 3),
            "finetune_seconds": round(train_s, 3)}
    return export_spec(pruned, output, opset=opset, steps_before=[step])
