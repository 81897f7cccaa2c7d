"""What onnxopt needs to know about a model source: its inputs, outputs, task and data.

A :class:`ModelSpec` describes a torch source (a built-in model or a user factory) without
importing torch: ``build()`` imports it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["InputSpec", "ModelSpec", "TASKS"]

TASKS = ("classification", "embedding", "other")


@dataclass(frozen=True)
class InputSpec:
    """One model input. ``shape`` holds ints for fixed dims and strings for dynamic ones
    (e.g. ``("batch", 1, 8, 8)``); ``dtype`` is a numpy dtype name."""

    name: str
    shape: tuple
    dtype: str = "float32"

    def concrete_shape(self, batch: int, seq: int | None = None) -> tuple[int, ...]:
        dims = []
        for d in self.shape:
            if isinstance(d, int):
                dims.append(d)
            elif d == "batch":
                dims.append(batch)
            elif d in ("seq", "sequence"):
                if seq is None:
                    raise ValueError(f"input {self.name} has a sequence axis; give seq")
                dims.append(seq)
            else:
                raise ValueError(f"input {self.name}: no value for dynamic dim {d!r}")
        return tuple(dims)


@dataclass(frozen=True)
class ModelSpec:
    """A torch model source and everything needed to export and verify it.

    ``build`` returns the ``nn.Module`` in eval mode with its weights loaded. ``sample_inputs``
    returns valid random inputs at a given batch (and sequence length, for text) -- token ids in
    the vocabulary, attention masks of ones. ``real_inputs`` returns real data when the model has
    it (digits test images, tokenized sentences), else None. ``exporter`` is the exporter measured
    better for this model ("torchscript" or "dynamo").
    """

    name: str
    summary: str
    task: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    build: Callable[[], object]
    sample_inputs: Callable[..., dict[str, np.ndarray]]
    real_inputs: Callable[..., dict[str, np.ndarray] | None] = lambda n=32: None
    dataset: str | None = None
    exporter: str = "dynamo"
    default_opset: int = 18
    seq_lengths: tuple[int, ...] = ()  # two sequence lengths to verify at, for text models
    builtin: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def has_seq(self) -> bool:
        return bool(self.seq_lengths)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for inp in self.inputs:
            named = {i: d for i, d in enumerate(inp.shape) if isinstance(d, str)}
            if named:
                axes[inp.name] = named
        return axes
