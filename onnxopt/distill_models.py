"""The models of :mod:`onnxopt.distill`: student builders, teachers, the shift augmentation.

Both :mod:`onnxopt.distill` (the job) and :mod:`onnxopt._distill_worker` (the training loop, in
this process or as a DDP worker) use these; neither imports the other at import time, and this
module imports neither. torch is imported lazily inside the functions, so importing this module
(and :mod:`onnxopt.distill`) does not import torch.
"""

from __future__ import annotations

import numpy as np

from .artifact import load_model
from .errors import BadInput
from .feeds import cast_feeds
from .runtime import make_session, run
from .sources import last_linear, require_torch

__all__ = ["digits_student", "STUDENTS", "build_student", "OrtTeacher", "TorchTeacher", "make_teacher",
           "shift_images"]


# ---------------------------------------------------------------------------------------------
# Students


def digits_student(width: float = 0.4, num_classes: int = 10, round_to: int = 8):
    """The DigitsCNN layout (Conv-BN-ReLU x2, MaxPool, Conv-BN-ReLU, global pool, Linear) with
    ``32 * width`` and ``64 * width`` channels rounded to a multiple of ``round_to``, as an
    ``nn.Sequential``. Width 1 is the teacher's shape; 0.4 gives 16/24 channels (0.16x the
    parameters), 0.25 gives 8/16 (0.07x).

    Why multiples of 8: ONNX Runtime's CPU convolutions run channel counts in blocks of 8; measured
    side by side (batch 450, 2 threads), 14/29 channels ran only 1.16x faster than the 32/64
    teacher, 16/24 channels 2.78x, with fewer parameters than 14/29 would have."""
    require_torch("digits-cnn student")
    from torch import nn

    def channels(c: int) -> int:
        q = max(1, int(round_to))
        return max(q, q * int(round(c * float(width) / q)))

    c1, c2 = channels(32), channels(64)
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, int(num_classes)),
    )


STUDENTS = {"digits-cnn": digits_student}


def build_student(student: str, width: float, num_classes: int, seed: int):
    """The student module, initialized from ``seed``: a built-in family or a factory."""
    torch = require_torch(student)
    torch.manual_seed(seed)
    if student in STUDENTS:
        return STUDENTS[student](width=width, num_classes=num_classes)
    from .sources import call_factory

    return call_factory(torch, student, "student factory")


# ---------------------------------------------------------------------------------------------
# Teachers: (logits, features or None) for a batch of inputs


def _logits(out: np.ndarray, where: str) -> np.ndarray:
    out = np.asarray(out, np.float32)
    if out.ndim != 2 or out.shape[1] < 2:
        raise BadInput(where, f"the teacher's first output has shape {list(out.shape)}, not class scores "
                       "[batch, classes]")
    if (out >= 0).all() and np.allclose(out.sum(1), 1.0, atol=1e-3):  # probabilities: use their log
        return np.log(np.maximum(out, 1e-12)).astype(np.float32)
    return out


class OrtTeacher:
    """An ONNX teacher in ONNX Runtime; ``hint`` adds that tensor as a second output."""

    def __init__(self, path: str, hint: str | None = None, threads: int | None = None):
        self.path = str(path)
        self.proto = load_model(path)
        self.hint = hint
        model = self.proto
        if hint:
            import onnx_ir as ir

            from .passes.head import find_value

            m = ir.serde.deserialize_model(self.proto)
            v = find_value(m, hint)
            if v is None:
                raise BadInput("--hint", f"no tensor named '{hint}' in {path}")
            if v.type is None:
                v.type = ir.TensorType(ir.DataType.FLOAT)
            m.graph.outputs[:] = [m.graph.outputs[0], v]
            model = ir.serde.serialize_model(m)
        self.session = make_session(model, "cpu", threads, self.path)
        inits = {i.name for i in self.proto.graph.initializer}
        self.input_names = [i.name for i in self.proto.graph.input if i.name not in inits]

    def __call__(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        res = run(self.session, cast_feeds(self.proto, feeds), self.path)
        feats = res[1].reshape(len(res[1]), -1).astype(np.float32) if self.hint else None
        return _logits(res[0], self.path), feats


class TorchTeacher:
    """A torch teacher (built-in name or factory); ``hint`` captures its last Linear's input."""

    def __init__(self, spec, hint: bool = False):
        self.torch = require_torch(spec.name)
        self.spec = spec
        self.path = spec.name
        self.net = spec.build().eval()
        self.input_names = [i.name for i in spec.inputs]
        self._feat = None
        if hint:
            lin = last_linear(self.torch, self.net)
            if lin is None:
                raise BadInput("--hint-weight", f"{spec.name} has no Linear layer whose input could be the hint")
            lin.register_forward_pre_hook(lambda m, args: setattr(self, "_feat", args[0]))
        self.hint = hint

    def __call__(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        torch = self.torch
        with torch.no_grad():
            out = self.net(*(torch.as_tensor(np.ascontiguousarray(feeds[n])) for n in self.input_names))
        feats = None
        if self.hint:
            feats = self._feat.detach().reshape(len(out), -1).numpy().astype(np.float32)
        return _logits(out.detach().numpy(), self.path), feats


def make_teacher(desc: dict, threads: int | None = None):
    """A teacher from its JSON-able description (what a DDP worker receives)."""
    if desc["kind"] == "onnx":
        return OrtTeacher(desc["path"], desc.get("hint"), threads)
    from .sources import resolve

    spec = resolve(desc["name"], input_shape=desc.get("input_shape"), weights=desc.get("weights"))
    return TorchTeacher(spec, bool(desc.get("hint")))


# ---------------------------------------------------------------------------------------------
# Augmentation


def shift_images(torch, x, shifts):
    """Move each image of ``x`` [B, C, H, W] by ``shifts[b] = (dy, dx)`` in {-1, 0, 1}, zero fill."""
    h, w = x.shape[-2:]
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1))
    out = torch.empty_like(x)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            m = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if bool(m.any()):
                out[m] = pad[m][:, :, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
    return out
