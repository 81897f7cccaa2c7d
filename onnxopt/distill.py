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

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx

from ._version import __version__
from .artifact import atomic_write_bytes, load_model, model_digest, read_sidecar, save_model
from .distill_models import (STUDENTS, OrtTeacher, TorchTeacher, build_student, digits_student, make_teacher,
                             shift_images)
from .errors import BadInput, check_choice, first_line
from .evaluate import top1, top1_agreement
from .feeds import Dataset, array_digest, cast_feeds, check_feeds, load_dataset
from .head import cache_root, check_labels, labelled_data
from .options import option
from .runtime import make_session, ort, run
from .sources import is_factory, is_onnx_path, last_linear, require_torch

__all__ = ["distill", "DistillSettings", "digits_student", "STUDENTS", "AUGMENTS", "OrtTeacher", "TorchTeacher",
           "make_teacher", "build_student", "shift_images"]

logger = logging.getLogger(__name__)

AUGMENTS = ("none", "shift")
CHECKPOINT = "last.pt"


# ---------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """Every option of :func:`distill` besides the teacher and the output, checked on creation
    (a bad value is a :class:`~onnxopt.errors.BadInput` naming its CLI flag).

    Each field is an :func:`onnxopt.options.option` (help text, CLI spelling, choices; ``cli=False``:
    Python only); ``onnxopt distill`` shows them through :func:`onnxopt.options.click_options`,
    so both say the same."""

    data: Any = option("digits", "Training inputs (labels optional): 'digits' (its train split), an .npz, an "
                       "image folder or module:function.", type=str)
    student: str = option("digits-cnn", "A built-in student family (digits-cnn) or a factory module:function.")
    width: float = option(0.4, "Channel multiplier of a built-in student, rounded to multiples of 8 channels "
                          "(0.4: 16/24 channels, 0.16x the digits-cnn parameters).")
    unlabelled: Any = option(None, "More training inputs without labels (teacher targets only).", type=str)
    test_data: Any = option(None, "Labelled data to compare teacher and student [default: digits test split when "
                            "training on digits].", type=str)
    temperature: float = option(2.0, "Softmax temperature of the KL loss.")
    alpha: float = option(0.5, "Weight of the label loss (1 = labels alone, 0 = teacher alone).")
    hint_weight: float = option(0.0, "Weight of the feature (hint) loss on the teacher's classifier input.")
    hint: str | None = option(None, "ONNX teacher: the tensor the hint loss matches [default: its classifier "
                              "input].")
    augment: Any = option("none", "none, shift (images moved up to one pixel; the teacher sees the same view) or "
                          "a hook module:function (x, generator) -> x.", type=str)
    epochs: int = option(20)
    batch: int = option(64, "Global batch (split across --nproc).")
    lr: float = option(3e-3, "Peak learning rate (one-cycle schedule).")
    weight_decay: float = option(1e-4)
    seed: int = option(0)
    nproc: int = option(1, "Processes: >1 runs DistributedDataParallel via torch.distributed.run (gloo on CPU, "
                        "nccl on GPU).")
    nnodes: int = option(1, "Machines: each runs this same command with its own --node-rank (torch.distributed.run "
                         "--nnodes); node 0 writes the student.")
    node_rank: int = option(0, "This machine's place among --nnodes (0 = the one that writes the output).")
    master: str | None = option(None, "HOST:PORT of node 0, where the processes meet (with --nnodes > 1).", type=str,
                                metavar="HOST:PORT")
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    threads: int = option(1, "torch threads per process.")
    checkpoint_dir: str | Path | None = option(None, "Where the per-epoch checkpoint goes [default: "
                                               "<output>.ckpt].", type=str, metavar="PATH")
    resume: bool = option(True, "Continue from the checkpoint of the same run if there is one (--no-resume: "
                          "start over).", off_flag="--no-resume")
    cache_dir: str | Path | None = option(None, "Teacher-target cache folder [default: ~/.cache/onnxopt].",
                                          type=str, metavar="PATH")
    cache: bool = option(True, "Read and write cached teacher targets (--no-cache: neither).",
                         off_flag="--no-cache")
    weights: str | None = option(None, "Torch factory teacher: a state_dict file.")
    input_shape: str | None = option(None, "Torch factory teacher: input shape, e.g. 1x1x8x8.")
    on_epoch_end: Any = option(None, "Called as on_epoch_end(epoch) after each epoch's checkpoint (one process "
                               "only).", cli=False)

    def __post_init__(self):
        self._check_numbers()
        augment, nproc = self.augment, int(self.nproc)
        if isinstance(augment, str) and augment not in AUGMENTS and not is_factory(augment):
            raise BadInput("--augment", f"'{augment}' is not one of {', '.join(AUGMENTS)} or module:function")
        if not callable(augment) and augment is not None and not isinstance(augment, str):
            raise BadInput("--augment", f"{augment!r} is not an augmentation")
        if self.student not in STUDENTS and not is_factory(self.student):
            raise BadInput("--student", f"'{self.student}' is neither a built-in student family "
                           f"({', '.join(STUDENTS)}) nor a factory module:function")
        if callable(augment) and nproc > 1:
            raise BadInput("--augment", "a Python callable cannot be sent to other processes",
                           "pass it as module:function")
        if self.on_epoch_end is not None and nproc > 1:
            raise BadInput("on_epoch_end", "is called in this process only; it cannot run with nproc > 1")
        check_choice(self.device, ("auto", "cpu", "cuda"), "--device")

    def _check_nodes(self) -> None:
        nnodes, rank = int(self.nnodes), int(self.node_rank)
        if nnodes < 1:
            raise BadInput("--nnodes", "must be >= 1")
        if not 0 <= rank < nnodes:
            raise BadInput("--node-rank", f"must be in 0..{nnodes - 1} for --nnodes {nnodes}, got {rank}")
        if nnodes > 1:
            host, _, port = str(self.master or "").rpartition(":")
            if not host or not port.isdigit():
                raise BadInput("--master", f"'{self.master}' is not HOST:PORT" if self.master else
                               "is needed with --nnodes > 1", "node 0's address and a free port, e.g. 10.0.0.1:29500")
            if int(self.batch) % (nnodes * int(self.nproc)):
                raise BadInput("--batch", f"{self.batch} is not divisible by {nnodes * int(self.nproc)} processes "
                               f"(--nnodes {nnodes} x --nproc {self.nproc})")

    def _check_numbers(self) -> None:
        if not 0 <= float(self.alpha) <= 1:
            raise BadInput("--alpha", f"must be in [0, 1] (the weight of the label loss), got {self.alpha}")
        if not float(self.temperature) > 0:
            raise BadInput("--temperature", f"must be > 0, got {self.temperature}")
        if not float(self.hint_weight) >= 0:
            raise BadInput("--hint-weight", f"must be >= 0, got {self.hint_weight}")
        if int(self.epochs) < 1:
            raise BadInput("--epochs", "must be >= 1")
        if int(self.batch) < 1:
            raise BadInput("--batch", "must be >= 1")
        if not float(self.lr) > 0:
            raise BadInput("--lr", f"must be > 0, got {self.lr}")
        if int(self.nproc) < 1:
            raise BadInput("--nproc", "must be >= 1")
        if int(self.batch) % int(self.nproc):
            raise BadInput("--batch", f"{self.batch} is not divisible by --nproc {self.nproc}",
                           "the global batch is split evenly across the processes")
        self._check_nodes()
        if not float(self.width) > 0:
            raise BadInput("--width", f"must be > 0, got {self.width}")

    @classmethod
    def from_options(cls, settings: DistillSettings | None = None, **options) -> DistillSettings:
        """``DistillSettings(**options)``, or ``settings`` with ``options`` replacing some of its
        fields; an unknown option is a ``BadInput`` naming it, with the nearest valid name."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                raise BadInput(str(key), "is not an option of distill",
                               f"did you mean '{near[0]}'?" if near else f"options: {', '.join(names)}")
        if settings is None:
            return cls(**options)
        if not isinstance(settings, cls):
            raise BadInput("settings", f"{type(settings).__name__} is not a DistillSettings")
        return dataclasses.replace(settings, **options) if options else settings


# ---------------------------------------------------------------------------------------------
# The job


class _Teacher(NamedTuple):
    """The resolved teacher: ``run(feeds) -> (logits, features or None)`` and what the job needs of it."""

    run: Any
    desc: dict  # JSON-able: what a DDP worker rebuilds it from, and the checkpoint fingerprint's part
    proto: onnx.ModelProto | None
    input_specs: tuple
    out_name: str
    dataset: str | None
    params: int

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.input_specs]


class _Data(NamedTuple):
    train: Dataset
    y: np.ndarray  # labels, -1 for samples without one
    test: Dataset | None
    augment: Any  # None, "shift", a hook module:function or a callable
    labelled: int


class _Student(NamedTuple):
    classes: int
    s_feat_dim: int | None
    t_feat_dim: int | None
    params: int


def distill(teacher: str | Path, output: str | Path, *, settings: DistillSettings | None = None, **options) -> dict:
    """Distill ``teacher`` into a ``student`` trained on ``data``; export it to ``output``, verified.

    The options are the fields of :class:`DistillSettings`, as keywords or as ``settings`` (keywords
    given with it replace its fields); an unknown one is a ``BadInput`` with the nearest name.

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
    s = DistillSettings.from_options(settings, **options)
    use_cuda = _use_cuda(torch, s)
    t_start = time.perf_counter()
    output = Path(output)
    t = _resolve_teacher(teacher, s)
    data = _resolve_data(s, t)
    st = _check_student(torch, s, t, data)
    need_teacher = float(s.alpha) < 1 or float(s.hint_weight) > 0
    online = data.augment is not None and need_teacher
    arrays, cache_hit = _training_arrays(s, t, data, need_teacher and not online)
    cfg = _job_config(torch, s, t, data, st, online, use_cuda, output)
    result = _run_training(cfg, arrays, s, t, data)
    if result is None:
        return {"node_rank": int(s.node_rank), "nnodes": int(s.nnodes), "output": None,
                "note": f"node {s.node_rank} of {s.nnodes} trained its share; node 0 writes {output}"}
    side, step = _export_student(s, t, data, cfg, result, output)
    student_params = _onnx_params(load_model(output)) if t.desc["kind"] == "onnx" else st.params
    targets = ("online (augmented views)" if online else ("cached" if cache_hit else "computed once")
               if need_teacher else "not used (labels only)")
    summary = _summary(step, t, cfg, result, student_params, targets, t_start)
    _compare_on_test(summary, t, data, output)
    return _write(output, side, summary)


def _use_cuda(torch, s: DistillSettings) -> bool:
    use_cuda = torch.cuda.is_available() if s.device == "auto" else s.device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise BadInput("--device", "cuda was asked for, but torch sees no GPU")
    if use_cuda and int(s.nproc) > torch.cuda.device_count():
        raise BadInput("--nproc", f"{s.nproc} processes need {s.nproc} GPUs; torch sees {torch.cuda.device_count()}",
                       "use --device cpu, or fewer processes")
    return use_cuda


def _onnx_params(proto: onnx.ModelProto) -> int:
    """Parameters as ONNX initializers (BatchNorm folded): how teacher and student are both counted."""
    import onnx_ir as ir

    from .passes.prune import count_params

    return count_params(ir.serde.deserialize_model(proto))


# ---------------------------------------------------------------------------------------------
# Resolve the teacher and the data


def _resolve_teacher(teacher, s: DistillSettings) -> _Teacher:
    if is_onnx_path(str(teacher)):
        return _onnx_teacher(teacher, s)
    return _torch_teacher(str(teacher), s)


def _onnx_teacher(teacher, s: DistillSettings) -> _Teacher:
    use_hint, hint = float(s.hint_weight) > 0, s.hint
    if s.weights is not None or s.input_shape is not None:
        raise BadInput("--weights", "only applies to a torch teacher, not to an ONNX file")
    proto = load_model(teacher)
    if use_hint and hint is None:
        import onnx_ir as ir

        from .passes.head import find_head

        hint = find_head(ir.serde.deserialize_model(proto), str(teacher)).feature
    tdesc = {"kind": "onnx", "path": str(Path(teacher).resolve()), "hint": hint if use_hint else None,
             "sha256": model_digest(proto)}
    run_ = OrtTeacher(teacher, tdesc["hint"])
    input_specs = _onnx_input_specs(proto)
    t_side = read_sidecar(teacher) or {}
    return _Teacher(run_, tdesc, proto, input_specs, proto.graph.output[0].name, t_side.get("dataset"),
                    _onnx_params(proto))


def _torch_teacher(name: str, s: DistillSettings) -> _Teacher:
    use_hint = float(s.hint_weight) > 0
    if s.hint is not None:
        raise BadInput("--hint", "names a tensor of an ONNX teacher; a torch teacher's hint is the input of "
                       "its last Linear layer")
    from .sources import resolve

    spec = resolve(name, input_shape=s.input_shape, weights=s.weights)
    tdesc = {"kind": "torch", "name": name, "weights": s.weights, "input_shape": s.input_shape, "hint": use_hint}
    run_ = TorchTeacher(spec, use_hint)
    h = hashlib.sha256()
    for k, v in sorted(run_.net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    tdesc["sha256"] = h.hexdigest()  # a checkpoint of another teacher's run is not resumed
    return _Teacher(run_, tdesc, None, spec.inputs, spec.outputs[0], spec.dataset,
                    sum(p.numel() for p in run_.net.parameters()))


def _onnx_input_specs(proto: onnx.ModelProto):
    from .artifact import io_signature
    from .spec import InputSpec

    out = []
    for i in io_signature(proto)["inputs"]:
        shape = tuple(("batch" if k == 0 else "seq") if not isinstance(d, int) else d
                      for k, d in enumerate(i["shape"]))
        out.append(InputSpec(i["name"], shape, i["dtype"] or "float32"))
    return tuple(out)


def _resolve_data(s: DistillSettings, t: _Teacher) -> _Data:
    input_names = t.input_names
    train, y = _training_data(s.data, s.unlabelled, input_names, t.proto)
    if t.proto is not None:
        check_feeds(t.proto, train.inputs, train.name)
    first_float = next((train.inputs[n] for n in input_names if train.inputs[n].dtype.kind == "f"), None)
    is_image = first_float is not None and first_float.ndim == 4
    augment = s.augment
    if augment == "none":
        augment = None
    elif augment == "shift" and not is_image:
        raise BadInput("--augment", "shift moves images; the first float input is not [N, C, H, W]",
                       "use --augment none or a hook module:function")
    labelled = int((y >= 0).sum())
    if float(s.alpha) == 1 and labelled < len(y):
        raise BadInput("--alpha", "1 trains on labels alone, but some samples have none",
                       "use alpha < 1 so unlabelled samples learn from the teacher")
    test_data = s.test_data
    if test_data is None and isinstance(s.data, str) and s.data == "digits":
        test_data = "digits"
    test = labelled_data(test_data, "--test-data", t.proto, "test", input_names) if test_data is not None else None
    return _Data(train, y, test, augment, labelled)


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


# ---------------------------------------------------------------------------------------------
# Build the student: the teacher's output width is the number of classes; the student must match it


def _check_student(torch, s: DistillSettings, t: _Teacher, data: _Data) -> _Student:
    input_names = t.input_names
    probe = {n: data.train.inputs[n][:2] for n in input_names}
    t_logits, t_feats = t.run(probe)
    classes = int(t_logits.shape[1])
    if data.labelled and int(data.y.max()) >= classes:
        raise BadInput("--data", f"has label {int(data.y.max())}, but the teacher scores {classes} classes")
    net = build_student(s.student, s.width, classes, s.seed)
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
    if float(s.hint_weight) > 0:
        lin = last_linear(torch, net)
        if lin is None:
            raise BadInput("--student", "has no Linear layer whose input could learn the hint")
        s_feat_dim = int(lin.in_features)
    return _Student(classes, s_feat_dim, None if t_feats is None else int(t_feats.shape[1]),
                    sum(p.numel() for p in net.parameters()))


# ---------------------------------------------------------------------------------------------
# Train: the teacher's targets once (cached by content hash) unless augmentation makes the teacher run on
# every batch; one process here, several through torch.distributed.run


def _training_arrays(s: DistillSettings, t: _Teacher, data: _Data, precompute: bool) -> tuple[dict, bool | None]:
    """(the arrays the training loop reads, whether the teacher's targets came from the cache)."""
    arrays = {f"input:{n}": np.ascontiguousarray(data.train.inputs[n]) for n in t.input_names}
    arrays["labels"] = data.y
    cache_hit = None
    if precompute:
        key = None
        if t.desc["kind"] == "onnx":
            key = [t.desc["sha256"], t.desc["hint"], array_digest(data.train.inputs), ort().__version__]
        logits, feats, cache_hit = _teacher_targets(t.run, data.train, s.cache, s.cache_dir, key)
        arrays["teacher_logits"] = logits
        if feats is not None:
            arrays["teacher_feats"] = feats
    return arrays, cache_hit


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


def _job_config(torch, s: DistillSettings, t: _Teacher, data: _Data, st: _Student, online: bool, use_cuda: bool,
                output: Path) -> dict:
    """What the training loop runs (JSON-able, for DDP workers too), fingerprinted for resuming."""
    aug = data.augment
    cfg = {
        "teacher": t.desc, "student": s.student, "width": float(s.width), "classes": st.classes,
        "input_names": t.input_names, "temperature": float(s.temperature), "alpha": float(s.alpha),
        "hint_weight": float(s.hint_weight), "s_feat_dim": st.s_feat_dim, "t_feat_dim": st.t_feat_dim,
        "augment": None if aug is None else (aug if isinstance(aug, str) else "callable"),
        "online_teacher": bool(online), "epochs": int(s.epochs), "batch": int(s.batch), "lr": float(s.lr),
        "weight_decay": float(s.weight_decay), "seed": int(s.seed), "nproc": int(s.nproc), "cuda": bool(use_cuda),
        "threads": int(s.threads), "data_sha256": array_digest({**data.train.inputs, "labels": data.y}),
        "torch": torch.__version__,
    }
    cfg["fingerprint"] = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    ckpt_dir = Path(s.checkpoint_dir) if s.checkpoint_dir is not None else output.with_name(output.name + ".ckpt")
    cfg["checkpoint"] = str(ckpt_dir / CHECKPOINT)
    cfg["resume"] = bool(s.resume)
    _check_checkpoint(torch, Path(cfg["checkpoint"]), cfg["fingerprint"], s.resume)
    return cfg


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


def _run_training(cfg: dict, arrays: dict, s: DistillSettings, t: _Teacher, data: _Data) -> dict:
    from . import _distill_worker as worker

    if int(s.nproc) == 1 and int(s.nnodes) == 1:
        return worker.train(cfg, arrays, rank=0, world=1, augment_fn=data.augment if callable(data.augment) else None,
                            teacher=t.run if cfg["online_teacher"] else None, on_epoch_end=s.on_epoch_end)
    return _launch(cfg, arrays, s)


def _launcher(cfg: dict, s: DistillSettings) -> list[str]:
    """torch.distributed.run's arguments: one machine (--standalone), or node ``node_rank`` of
    ``nnodes`` meeting at ``master`` (static rendezvous: node 0 holds global rank 0)."""
    if int(s.nnodes) == 1:
        return ["--standalone", "--nproc-per-node", str(cfg["nproc"])]
    host, _, port = str(s.master).rpartition(":")
    return ["--nnodes", str(s.nnodes), "--node-rank", str(s.node_rank), "--master-addr", host, "--master-port", port,
            "--nproc-per-node", str(cfg["nproc"])]


def _launch(cfg: dict, arrays: dict[str, np.ndarray], s: DistillSettings) -> dict | None:
    """Run the training in ``cfg["nproc"]`` processes (on each of ``nnodes`` machines) with
    torch.distributed.run; read the result. None on a node other than 0 (node 0 writes it)."""
    torch = require_torch("distill")
    with tempfile.TemporaryDirectory(prefix="onnxopt-distill.") as tmp:
        job = Path(tmp)
        np.savez(job / "arrays.npz", **arrays)
        (job / "job.json").write_text(json.dumps(cfg, sort_keys=True))
        cmd = [sys.executable, "-m", "torch.distributed.run", *_launcher(cfg, s), "-m", "onnxopt._distill_worker",
               str(job)]
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
        if proc.returncode == 0 and int(s.node_rank) > 0:
            return None  # this node's processes trained their share; node 0 has the result
        if proc.returncode != 0 or not res_path.is_file():
            raise RuntimeError(f"distributed training failed (torch.distributed.run exited {proc.returncode}); "
                               "the workers' errors are above")
        result = json.loads(res_path.read_text())
        result["launch_seconds"] = round(time.perf_counter() - t0, 3)
        result["launcher"] = "torch.distributed.run " + " ".join(_launcher(cfg, s)[:2])
        ck = torch.load(cfg["checkpoint"], map_location="cpu", weights_only=True)
        result["state"] = ck["student"]
    return result


# ---------------------------------------------------------------------------------------------
# Export the student (verified against torch)


def _export_student(s: DistillSettings, t: _Teacher, data: _Data, cfg: dict, result: dict,
                    output: Path) -> tuple[dict, dict]:
    """(the exported student's sidecar, the ``distill`` step recorded in it)."""
    net = build_student(s.student, s.width, cfg["classes"], s.seed)
    net.load_state_dict(result["state"])
    net.eval()
    from .export import export_spec

    builtin = s.student in STUDENTS
    step = {"step": "distill", "teacher": t.desc.get("path") and Path(t.desc["path"]).name or t.desc.get("name"),
            "student": s.student, "width": float(s.width) if builtin else None,
            "temperature": float(s.temperature), "alpha": float(s.alpha), "hint_weight": float(s.hint_weight),
            "hint": t.desc.get("hint"), "augment": cfg["augment"], "epochs": int(s.epochs), "batch": int(s.batch),
            "lr": float(s.lr), "weight_decay": float(s.weight_decay), "seed": int(s.seed), "nproc": int(s.nproc),
            "nnodes": int(s.nnodes),
            "backend": result.get("backend"), "training_data": data.train.name, "samples": len(data.train),
            "labelled": data.labelled, "train_losses": result["losses"],
            "resumed_from_epoch": result.get("resumed_from"), "train_seconds": result.get("seconds"),
            "onnxopt": __version__}
    return export_spec(_student_spec(s, t, data, net), output, steps_before=[step]), step


def _student_spec(s: DistillSettings, t: _Teacher, data: _Data, net):
    from .spec import InputSpec, ModelSpec

    student, width = s.student, s.width
    sample_src = data.test if data.test is not None else data.train
    real = {n: np.ascontiguousarray(sample_src.inputs[n][:32]) for n in t.input_names}
    return ModelSpec(
        name=student if student not in STUDENTS else f"{student} (width {width:g}, distilled)",
        summary=f"student of {t.desc.get('path') or t.desc.get('name')}", task="classification",
        inputs=tuple(InputSpec(i.name, tuple(i.shape), i.dtype) for i in t.input_specs), outputs=(t.out_name,),
        build=lambda: net, sample_inputs=_sampler(t.input_specs, data.train), real_inputs=lambda n=32: {
            k: v[:n] for k, v in real.items()}, dataset=t.dataset, exporter="dynamo", builtin=student in STUDENTS,
        extra={"width": float(width)} if student in STUDENTS else {})


def _sampler(input_specs, train: Dataset):
    """Random inputs for export verification: samples of the training data, tiled to ``batch``
    (real values in range, which random normals may not be for e.g. token ids)."""

    def sample(batch: int, seq: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(train), size=batch)
        return {i.name: np.ascontiguousarray(train.inputs[i.name][idx]) for i in input_specs}

    return sample


# ---------------------------------------------------------------------------------------------
# Verify: the student beside the teacher (parameters, and accuracy on the test data)


def _summary(step: dict, t: _Teacher, cfg: dict, result: dict, student_params: int, targets: str,
             t_start: float) -> dict:
    onnx_teacher = t.desc["kind"] == "onnx"
    return {"teacher": step["teacher"], "teacher_params": int(t.params), "student": step["student"],
            "width": step["width"], "student_params": int(student_params),
            "params_ratio": round(student_params / max(t.params, 1), 4),
            "params_counted": "ONNX initializers" if onnx_teacher else "torch parameters",
            "classes": cfg["classes"],
            "temperature": step["temperature"], "alpha": step["alpha"], "hint_weight": step["hint_weight"],
            "augment": step["augment"], "epochs": step["epochs"], "nproc": step["nproc"], "nnodes": step["nnodes"],
            "backend": result.get("backend"),
            "training_data": step["training_data"], "samples": step["samples"], "labelled": step["labelled"],
            "teacher_targets": targets,
            "coverage": result.get("coverage"), "train_losses": result["losses"],
            "resumed_from_epoch": result.get("resumed_from"), "checkpoint": cfg["checkpoint"],
            "seconds": round(time.perf_counter() - t_start, 3)}


def _compare_on_test(summary: dict, t: _Teacher, data: _Data, output: Path) -> None:
    """Add the teacher's and the student's accuracy on the test data, and their agreement."""
    test = data.test
    if test is None:
        return
    input_names = t.input_names
    sl = _predict(load_model(output), test, input_names)
    tl = np.concatenate([t.run({n: f[n] for n in input_names})[0] for f, _ in test.batches(256)])
    summary.update(test_data=test.name, test_samples=len(test),
                   teacher_acc=top1(tl, test.labels), student_acc=top1(sl, test.labels),
                   agreement_top1=top1_agreement(tl, sl))
    summary["drop_points"] = round(100 * (summary["teacher_acc"] - summary["student_acc"]), 4)


def _predict(proto: onnx.ModelProto, ds: Dataset, names: list[str]) -> np.ndarray:
    sess = make_session(proto, "cpu", None, "student")
    return np.concatenate([run(sess, cast_feeds(proto, {n: f[n] for n in names}), "student")[0]
                           for f, _ in ds.batches(256)])


# ---------------------------------------------------------------------------------------------
# Write the sidecar with the summary


def _write(output: Path, side: dict, summary: dict) -> dict:
    meta = {k: v for k, v in side.items() if k not in ("model", "sha256", "bytes", "io", "opset", "export_seconds")}
    meta["distill"] = summary
    return save_model(load_model(output), output, meta)
