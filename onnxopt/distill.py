"""Knowledge distillation: train a small student on a teacher's soft targets, then export and verify.

``distill(teacher, output, data=...)`` is what ``onnxopt distill`` calls.

* **Teacher**: an ``.onnx`` file, run in ONNX Runtime (its soft targets on the un-augmented data
  are computed once and cached by content hash), or a built-in model / factory ``module:function``
  run in torch. Its first output must be class scores ``[batch, classes]``; a teacher that ends in
  Softmax gives probabilities, whose logarithm serves as logits.
* **Student**: a built-in family scaled by ``width`` (``digits-cnn``: the DigitsCNN layout with
  ``32 * width`` / ``64 * width`` channels rounded to multiples of 8, see :func:`digits_student`) or a factory
  ``module:function`` returning an ``nn.Module`` with the teacher's number of outputs.
* **Loss**: ``(1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + alpha *
  cross-entropy(labels)`` plus, with ``hint_weight > 0``, a FitNets hint: the MSE between a learned
  linear projection of the student's classifier input and the teacher's feature tensor
  (its classifier input by default). Samples without labels (``unlabelled`` data, or data with no
  labels at all) get the KL term only; ``alpha=1`` is training on labels alone (the baseline).
* **Augmentation** (hooks): ``"none"`` (default), ``"shift"`` (each image moved by up to one pixel,
  zero fill, drawn per sample and epoch, so it does not depend on how the data is split across
  processes) or ``module:function`` ``(x, generator) -> x`` on the first float input. With
  augmentation the teacher runs on the augmented batch (same view for teacher and student).
  Default none because it measured better here: on digits, 20 epochs, a small student lost about
  half a point with shift (``benchmarks/results/distill.md``).
* **Training**: Adam with a one-cycle schedule, a fixed seed, deterministic algorithms, progress
  bars; a checkpoint after every epoch, written atomically; an interrupted run resumes from it
  (same settings -> same bytes as an uninterrupted run).
* **Several processes** (``nproc > 1``): the same training under PyTorch
  ``DistributedDataParallel``, launched with torch's own launcher (``python -m
  torch.distributed.run --standalone``): ``gloo`` on CPU, ``nccl`` on GPUs; each process reads its
  share through ``DistributedSampler`` with ``batch / nproc`` samples per step, so a step sees the
  same global batch as one process would; rank 0 writes checkpoints and the result.

The job ends with the export of the student (verified against torch), and its accuracy and agreement
with the teacher on the test data, side by side in the sidecar (``distill``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from ._version import __version__
from .artifact import atomic_write_bytes, load_model, model_bytes, read_sidecar, save_model
from .errors import BadInput, check_choice, first_line
from .evaluate import top1, top1_agreement
from .feeds import Dataset, array_digest, cast_feeds, check_feeds, load_dataset
from .head import cache_root, check_labels, labelled_data
from .runtime import make_session, ort, run
from .sources import is_factory, is_onnx_path, last_linear, require_torch

__all__ = ["distill", "digits_student", "STUDENTS", "AUGMENTS", "OrtTeacher", "TorchTeacher", "make_teacher",
           "build_student", "shift_images"]

logger = logging.getLogger(__name__)

AUGMENTS = ("none", "shift")
CHECKPOINT = "last.pt"


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


def _teacher_targets(teacher, ds: Dataset, cache: bool, cache_dir, key_parts: list | None) -> tuple:
    """Teacher logits (and hint features) on every sample, cached by content hash for ONNX."""
    path = None
    if cache and key_parts is not None:
        key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:32]
        path = cache_root(cache_dir) / "teacher" / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    logits = z["logits"]
                    feats = z["feats"] if "feats" in z.files else None
                if len(logits) == len(ds):
                    return logits, feats, True
            except (OSError, ValueError, KeyError):
                logger.warning("teacher cache %s is unreadable; computing again", path)
    from .progress import progress

    parts, fparts = [], []
    for feeds, _ in progress(ds.batches(256), total=-(-len(ds) // 256), desc="teacher targets", unit="batch"):
        lg, ft = teacher(feeds)
        parts.append(lg)
        if ft is not None:
            fparts.append(ft)
    logits = np.concatenate(parts)
    feats = np.concatenate(fparts) if fparts else None
    if path is not None:
        import io

        buf = io.BytesIO()
        np.savez(buf, logits=logits, **({"feats": feats} if feats is not None else {}))
        try:
            atomic_write_bytes(path, buf.getvalue())
        except (OSError, BadInput) as e:
            logger.warning("cannot write the teacher cache (%s)", e)
    return logits, feats, False


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


# ---------------------------------------------------------------------------------------------
# The job


def _check(alpha, temperature, hint_weight, epochs, batch, lr, nproc, width, augment, student):
    if not 0 <= float(alpha) <= 1:
        raise BadInput("--alpha", f"must be in [0, 1] (the weight of the label loss), got {alpha}")
    if not float(temperature) > 0:
        raise BadInput("--temperature", f"must be > 0, got {temperature}")
    if not float(hint_weight) >= 0:
        raise BadInput("--hint-weight", f"must be >= 0, got {hint_weight}")
    if int(epochs) < 1:
        raise BadInput("--epochs", "must be >= 1")
    if int(batch) < 1:
        raise BadInput("--batch", "must be >= 1")
    if not float(lr) > 0:
        raise BadInput("--lr", f"must be > 0, got {lr}")
    if int(nproc) < 1:
        raise BadInput("--nproc", "must be >= 1")
    if int(batch) % int(nproc):
        raise BadInput("--batch", f"{batch} is not divisible by --nproc {nproc}",
                       "the global batch is split evenly across the processes")
    if not float(width) > 0:
        raise BadInput("--width", f"must be > 0, got {width}")
    if isinstance(augment, str) and augment not in AUGMENTS and not is_factory(augment):
        raise BadInput("--augment", f"'{augment}' is not one of {', '.join(AUGMENTS)} or module:function")
    if not callable(augment) and augment is not None and not isinstance(augment, str):
        raise BadInput("--augment", f"{augment!r} is not an augmentation")
    if student not in STUDENTS and not is_factory(student):
        raise BadInput("--student", f"'{student}' is neither a built-in student family "
                       f"({', '.join(STUDENTS)}) nor a factory module:function")


def _training_data(data, unlabelled, input_names: list[str], proto) -> tuple[Dataset, np.ndarray]:
    """(inputs, labels with -1 for samples without one)."""
    if data is None:
        raise BadInput("--data", "distillation needs training inputs", "pass --data digits or an .npz")
    if isinstance(data, str) and data == "digits":
        ds = labelled_data("digits", "--data", proto, "train", input_names)
    else:
        ds = load_dataset(data, proto)
        if len(input_names) == 1 and len(ds.inputs) == 1 and input_names[0] not in ds.inputs:
            ds = Dataset(ds.name, {input_names[0]: next(iter(ds.inputs.values()))}, ds.labels)
    if ds.labels is not None:
        y = check_labels(ds, "--data")
    else:
        y = np.full(len(ds), -1, np.int64)
    if unlabelled is not None:
        u = load_dataset(unlabelled, proto)
        if len(input_names) == 1 and len(u.inputs) == 1 and input_names[0] not in u.inputs:
            u = Dataset(u.name, {input_names[0]: next(iter(u.inputs.values()))}, None)
        missing = [n for n in input_names if n not in u.inputs]
        if missing:
            raise BadInput("--unlabelled", f"{u.name} has no array for input(s) {', '.join(missing)}")
        ds = Dataset(f"{ds.name} + {u.name} (unlabelled)",
                     {n: np.concatenate([ds.inputs[n], u.inputs[n].astype(ds.inputs[n].dtype)]) for n in input_names},
                     None)
        y = np.concatenate([y, np.full(len(u), -1, np.int64)])
    for n in input_names:
        if n not in ds.inputs:
            raise BadInput("--data", f"{ds.name} has no array for the teacher input '{n}'",
                           f"it has {', '.join(sorted(ds.inputs))}")
    ds = Dataset(ds.name, {n: ds.inputs[n] for n in input_names}, None)
    if len(y) != len(ds):
        raise BadInput("--data", f"{len(y)} labels for {len(ds)} samples")
    return ds, y


def distill(
    teacher: str | Path,
    output: str | Path,
    *,
    data="digits",
    student: str = "digits-cnn",
    width: float = 0.4,
    unlabelled=None,
    test_data=None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    hint_weight: float = 0.0,
    hint: str | None = None,
    augment: str | None = "none",
    epochs: int = 20,
    batch: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    nproc: int = 1,
    device: str = "auto",
    threads: int = 1,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    weights: str | None = None,
    input_shape: str | None = None,
    on_epoch_end=None,
) -> dict:
    """Distill ``teacher`` into a ``student`` trained on ``data``; export it to ``output``, verified.

    * ``teacher``: an ``.onnx`` file, a built-in model or a factory (``weights``/``input_shape``).
    * ``data``: training inputs (``digits`` = its train split; labels optional); ``unlabelled``:
      more inputs without labels; ``test_data`` (default: the digits test split when training on
      digits): teacher and student accuracy side by side.
    * ``student``/``width``: a built-in family (``digits-cnn``) scaled by ``width``, or a factory.
    * ``temperature``, ``alpha`` (label-loss weight; 1 = labels alone), ``hint_weight``/``hint``
      (feature loss on the teacher tensor ``hint``, default its classifier input), ``augment``
      (none | shift | module:function).
    * ``epochs``, ``batch`` (global), ``lr``, ``weight_decay``, ``seed``, ``threads`` (per process).
    * ``nproc``: processes (DistributedDataParallel through torch.distributed.run); ``device``:
      auto | cpu | cuda.
    * ``checkpoint_dir`` (default ``<output>.ckpt``): a checkpoint per epoch; with ``resume`` a
      run with the same settings continues from it (a finished one is exported again as is).
    * ``on_epoch_end(epoch)``: called after each epoch's checkpoint (one process only).

    Returns the output's sidecar; ``distill`` holds the summary (accuracies, parameters, losses).
    """
    torch = require_torch("distill")
    _check(alpha, temperature, hint_weight, epochs, batch, lr, nproc, width, augment, student)
    if callable(augment) and int(nproc) > 1:
        raise BadInput("--augment", "a Python callable cannot be sent to other processes",
                       "pass it as module:function")
    if on_epoch_end is not None and int(nproc) > 1:
        raise BadInput("on_epoch_end", "is called in this process only; it cannot run with nproc > 1")
    check_choice(device, ("auto", "cpu", "cuda"), "--device")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise BadInput("--device", "cuda was asked for, but torch sees no GPU")
    if use_cuda and int(nproc) > torch.cuda.device_count():
        raise BadInput("--nproc", f"{nproc} processes need {nproc} GPUs; torch sees {torch.cuda.device_count()}",
                       "use --device cpu, or fewer processes")
    t_start = time.perf_counter()
    output = Path(output)

    # Teacher.
    use_hint = float(hint_weight) > 0
    if is_onnx_path(str(teacher)):
        if weights is not None or input_shape is not None:
            raise BadInput("--weights", "only applies to a torch teacher, not to an ONNX file")
        proto = load_model(teacher)
        if use_hint and hint is None:
            import onnx_ir as ir

            from .passes.head import find_head

            hint = find_head(ir.serde.deserialize_model(proto), str(teacher)).feature
        tdesc = {"kind": "onnx", "path": str(Path(teacher).resolve()), "hint": hint if use_hint else None,
                 "sha256": hashlib.sha256(model_bytes(proto)).hexdigest()}
        t = OrtTeacher(teacher, tdesc["hint"])
        input_specs = _onnx_input_specs(proto)
        out_name = proto.graph.output[0].name
        t_side = read_sidecar(teacher) or {}
        t_dataset = t_side.get("dataset")
        from .passes.prune import count_params
        import onnx_ir as ir

        teacher_params = count_params(ir.serde.deserialize_model(proto))
    else:
        if hint is not None:
            raise BadInput("--hint", "names a tensor of an ONNX teacher; a torch teacher's hint is the input of "
                           "its last Linear layer")
        from .sources import resolve

        spec = resolve(str(teacher), input_shape=input_shape, weights=weights)
        tdesc = {"kind": "torch", "name": str(teacher), "weights": weights, "input_shape": input_shape,
                 "hint": use_hint}
        t = TorchTeacher(spec, use_hint)
        proto = None
        input_specs = spec.inputs
        out_name = spec.outputs[0]
        t_dataset = spec.dataset
        teacher_params = sum(p.numel() for p in t.net.parameters())
        h = hashlib.sha256()
        for k, v in sorted(t.net.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        tdesc["sha256"] = h.hexdigest()  # a checkpoint of another teacher's run is not resumed
    input_names = [i.name for i in input_specs]

    # Data.
    train, y = _training_data(data, unlabelled, input_names, proto)
    if proto is not None:
        check_feeds(proto, train.inputs, train.name)
    first_float = next((train.inputs[n] for n in input_names if train.inputs[n].dtype.kind == "f"), None)
    is_image = first_float is not None and first_float.ndim == 4
    if augment == "none":
        augment = None
    elif augment == "shift" and not is_image:
        raise BadInput("--augment", "shift moves images; the first float input is not [N, C, H, W]",
                       "use --augment none or a hook module:function")
    labelled = int((y >= 0).sum())
    if float(alpha) == 1 and labelled < len(y):
        raise BadInput("--alpha", "1 trains on labels alone, but some samples have none",
                       "use alpha < 1 so unlabelled samples learn from the teacher")
    if test_data is None and isinstance(data, str) and data == "digits":
        test_data = "digits"
    test = labelled_data(test_data, "--test-data", proto, "test", input_names) if test_data is not None else None

    # Classes: the teacher's output width; the student must match it.
    probe = {n: train.inputs[n][:2] for n in input_names}
    t_logits, t_feats = t(probe)
    classes = int(t_logits.shape[1])
    if labelled and int(y.max()) >= classes:
        raise BadInput("--data", f"has label {int(y.max())}, but the teacher scores {classes} classes")
    net = build_student(student, width, classes, seed)
    try:
        with torch.no_grad():
            s_out = net.eval()(*(torch.as_tensor(np.ascontiguousarray(probe[n])) for n in input_names))
    except Exception as e:
        raise BadInput("--student", f"the student rejects the teacher's inputs: {type(e).__name__}: "
                       f"{first_line(e, 200)}") from None
    if not isinstance(s_out, torch.Tensor) or s_out.ndim != 2 or s_out.shape[1] != classes:
        shape = list(s_out.shape) if isinstance(s_out, torch.Tensor) else type(s_out).__name__
        raise BadInput("--student", f"outputs {shape} per batch, but the teacher scores {classes} classes",
                       f"build the student with {classes} outputs")
    s_feat_dim = None
    if use_hint:
        lin = last_linear(torch, net)
        if lin is None:
            raise BadInput("--student", "has no Linear layer whose input could learn the hint")
        s_feat_dim = int(lin.in_features)
    student_params = sum(p.numel() for p in net.parameters())

    # Teacher targets: once, cached, unless augmentation makes the teacher run on every batch.
    need_teacher = float(alpha) < 1 or use_hint
    online = augment is not None and need_teacher
    arrays = {f"input:{n}": np.ascontiguousarray(train.inputs[n]) for n in input_names}
    arrays["labels"] = y
    cache_hit = None
    if need_teacher and not online:
        key = None
        if tdesc["kind"] == "onnx":
            key = [tdesc["sha256"], tdesc["hint"], array_digest(train.inputs), ort().__version__]
        logits, feats, cache_hit = _teacher_targets(t, train, cache, cache_dir, key)
        arrays["teacher_logits"] = logits
        if feats is not None:
            arrays["teacher_feats"] = feats
    t_feat_dim = None if t_feats is None else int(t_feats.shape[1])

    aug_desc = None if augment is None else (augment if isinstance(augment, str) else "callable")
    cfg = {
        "teacher": tdesc, "student": student, "width": float(width), "classes": classes,
        "input_names": input_names, "temperature": float(temperature), "alpha": float(alpha),
        "hint_weight": float(hint_weight), "s_feat_dim": s_feat_dim, "t_feat_dim": t_feat_dim,
        "augment": aug_desc, "online_teacher": bool(online and need_teacher), "epochs": int(epochs),
        "batch": int(batch), "lr": float(lr), "weight_decay": float(weight_decay), "seed": int(seed),
        "nproc": int(nproc), "cuda": bool(use_cuda), "threads": int(threads),
        "data_sha256": array_digest({**train.inputs, "labels": y}), "torch": torch.__version__,
    }
    cfg["fingerprint"] = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else output.with_name(output.name + ".ckpt")
    cfg["checkpoint"] = str(ckpt_dir / CHECKPOINT)
    cfg["resume"] = bool(resume)
    _check_checkpoint(torch, Path(cfg["checkpoint"]), cfg["fingerprint"], resume)

    from . import _distill_worker as worker

    if int(nproc) == 1:
        result = worker.train(cfg, arrays, rank=0, world=1, augment_fn=augment if callable(augment) else None,
                              teacher=t if cfg["online_teacher"] else None, on_epoch_end=on_epoch_end)
    else:
        result = _launch(cfg, arrays)
    state = result["state"]

    # Export the student (verified against torch) and compare it with the teacher.
    net = build_student(student, width, classes, seed)
    net.load_state_dict(state)
    net.eval()
    from .export import export_spec
    from .spec import InputSpec, ModelSpec

    sample_src = test if test is not None else train
    real = {n: np.ascontiguousarray(sample_src.inputs[n][:32]) for n in input_names}
    sspec = ModelSpec(
        name=student if student not in STUDENTS else f"{student} (width {width:g}, distilled)",
        summary=f"student of {tdesc.get('path') or tdesc.get('name')}", task="classification",
        inputs=tuple(InputSpec(i.name, tuple(i.shape), i.dtype) for i in input_specs), outputs=(out_name,),
        build=lambda: net, sample_inputs=_sampler(input_specs, train), real_inputs=lambda n=32: {
            k: v[:n] for k, v in real.items()}, dataset=t_dataset, exporter="dynamo", builtin=student in STUDENTS,
        extra={"width": float(width)} if student in STUDENTS else {})
    step = {"step": "distill", "teacher": tdesc.get("path") and Path(tdesc["path"]).name or tdesc.get("name"),
            "student": student, "width": float(width) if student in STUDENTS else None,
            "temperature": float(temperature), "alpha": float(alpha), "hint_weight": float(hint_weight),
            "hint": tdesc.get("hint"), "augment": aug_desc, "epochs": int(epochs), "batch": int(batch),
            "lr": float(lr), "weight_decay": float(weight_decay), "seed": int(seed), "nproc": int(nproc),
            "backend": result.get("backend"), "training_data": train.name, "samples": len(train),
            "labelled": labelled, "train_losses": result["losses"], "resumed_from_epoch": result.get("resumed_from"),
            "train_seconds": result.get("seconds"), "onnxopt": __version__}
    side = export_spec(sspec, output, steps_before=[step])
    if tdesc["kind"] == "onnx":  # count both the same way: ONNX initializers (BatchNorm folded)
        from .passes.prune import count_params
        import onnx_ir as ir

        student_params = count_params(ir.serde.deserialize_model(load_model(output)))
    summary = {"teacher": step["teacher"], "teacher_params": int(teacher_params), "student": student,
               "width": step["width"], "student_params": int(student_params),
               "params_ratio": round(student_params / max(teacher_params, 1), 4),
               "params_counted": "ONNX initializers" if tdesc["kind"] == "onnx" else "torch parameters",
               "classes": classes,
               "temperature": float(temperature), "alpha": float(alpha), "hint_weight": float(hint_weight),
               "augment": aug_desc, "epochs": int(epochs), "nproc": int(nproc), "backend": result.get("backend"),
               "training_data": train.name, "samples": len(train), "labelled": labelled,
               "teacher_targets": "online (augmented views)" if cfg["online_teacher"] else
               ("cached" if cache_hit else "computed once") if need_teacher else "not used (labels only)",
               "coverage": result.get("coverage"), "train_losses": result["losses"],
               "resumed_from_epoch": result.get("resumed_from"), "checkpoint": cfg["checkpoint"],
               "seconds": round(time.perf_counter() - t_start, 3)}
    if test is not None:
        s_proto = load_model(output)
        sl = _predict(s_proto, test, input_names)
        tl = np.concatenate([t({n: f[n] for n in input_names})[0] for f, _ in test.batches(256)])
        summary.update(test_data=test.name, test_samples=len(test),
                       teacher_acc=top1(tl, test.labels), student_acc=top1(sl, test.labels),
                       agreement_top1=top1_agreement(tl, sl))
        summary["drop_points"] = round(100 * (summary["teacher_acc"] - summary["student_acc"]), 4)
    meta = {k: v for k, v in side.items() if k not in ("model", "sha256", "bytes", "io", "opset", "export_seconds")}
    meta["distill"] = summary
    return save_model(load_model(output), output, meta)


def _predict(proto: onnx.ModelProto, ds: Dataset, names: list[str]) -> np.ndarray:
    sess = make_session(proto, "cpu", None, "student")
    return np.concatenate([run(sess, cast_feeds(proto, {n: f[n] for n in names}), "student")[0]
                           for f, _ in ds.batches(256)])


def _onnx_input_specs(proto: onnx.ModelProto):
    from .artifact import io_signature
    from .spec import InputSpec

    out = []
    for i in io_signature(proto)["inputs"]:
        shape = tuple(("batch" if k == 0 else "seq") if not isinstance(d, int) else d
                      for k, d in enumerate(i["shape"]))
        out.append(InputSpec(i["name"], shape, i["dtype"] or "float32"))
    return tuple(out)


def _sampler(input_specs, train: Dataset):
    """Random inputs for export verification: samples of the training data, tiled to ``batch``
    (real values in range, which random normals may not be for e.g. token ids)."""

    def sample(batch: int, seq: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(train), size=batch)
        return {i.name: np.ascontiguousarray(train.inputs[i.name][idx]) for i in input_specs}

    return sample


def _check_checkpoint(torch, path: Path, fingerprint: str, resume: bool) -> None:
    if not resume or not path.is_file():
        return
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(str(path), f"cannot read the checkpoint ({type(e).__name__})",
                       "delete it or pass --no-resume") from None
    if ck.get("fingerprint") != fingerprint:
        raise BadInput(str(path), "was written by a run with other settings, data or teacher",
                       "pass --no-resume to start over, or choose another --checkpoint-dir")


def _launch(cfg: dict, arrays: dict[str, np.ndarray]) -> dict:
    """Run the training in ``cfg["nproc"]`` processes with torch.distributed.run; read the result."""
    torch = require_torch("distill")
    with tempfile.TemporaryDirectory(prefix="onnxopt-distill.") as tmp:
        job = Path(tmp)
        np.savez(job / "arrays.npz", **arrays)
        (job / "job.json").write_text(json.dumps(cfg, sort_keys=True))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(cfg["nproc"]), "-m", "onnxopt._distill_worker", str(job)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root, os.getcwd()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                    else []))
        env["OMP_NUM_THREADS"] = str(cfg["threads"])
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        logger.info("launching: %s", " ".join(cmd))
        t0 = time.perf_counter()
        # Workers' stdout goes to our stderr (stdout is for data); their stderr (progress) is ours.
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
        if proc.stdout:
            sys.stderr.write(proc.stdout)
        res_path = job / "result.json"
        if proc.returncode != 0 or not res_path.is_file():
            raise RuntimeError(f"distributed training failed (torch.distributed.run exited {proc.returncode}); "
                               "the workers' errors are above")
        result = json.loads(res_path.read_text())
        result["launch_seconds"] = round(time.perf_counter() - t0, 3)
        result["launcher"] = "torch.distributed.run --standalone"
        ck = torch.load(cfg["checkpoint"], map_location="cpu", weights_only=True)
        result["state"] = ck["student"]
    return result
