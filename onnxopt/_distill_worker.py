"""The training loop of :mod:`onnxopt.distill`, in one process or as a DDP worker.

``train(cfg, arrays, rank, world)`` is the loop; :func:`onnxopt.distill.distill` calls it directly
for one process. For ``nproc > 1`` it launches ``python -m torch.distributed.run --standalone
--nproc-per-node N -m onnxopt._distill_worker JOB``; :func:`main` then joins the process group
(``gloo`` on CPU, ``nccl`` on GPUs), wraps the student in ``DistributedDataParallel`` and runs the
same loop on its ``DistributedSampler`` share. Rank 0 writes the checkpoints and ``JOB/result.json``.

This module imports torch at import time; :mod:`onnxopt.distill` imports it lazily. It does not
import :mod:`onnxopt.distill`: the students, teachers and augmentation both use are in
:mod:`onnxopt.distill_models`.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from onnxopt.artifact import atomic_write_bytes
from onnxopt.distill_models import build_student, make_teacher, shift_images
from onnxopt.progress import progress
from onnxopt.sources import last_linear

__all__ = ["train", "main"]


class _Trainee(nn.Module):
    """The student plus (for the hint loss) a linear projection of its classifier input onto the
    teacher's feature size; the projection is dropped at export."""

    def __init__(self, student: nn.Module, regressor: nn.Module | None):
        super().__init__()
        self.student = student
        self.regressor = regressor
        self._feat = None
        if regressor is not None:
            last_linear(torch, student).register_forward_pre_hook(lambda m, args: setattr(self, "_feat", args[0]))

    def forward(self, *inputs):
        logits = self.student(*inputs)
        if self.regressor is None:
            return logits
        return logits, self.regressor(self._feat.flatten(1))


def _augmenter(cfg: dict, augment_fn):
    if augment_fn is not None:
        return augment_fn
    name = cfg.get("augment")
    if not name or name == "shift":
        return None
    import importlib

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    mod, fn = name.split(":")
    return getattr(importlib.import_module(mod), fn)


def _save(path: Path, obj: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def train(cfg: dict, arrays: dict[str, np.ndarray], rank: int = 0, world: int = 1, *, local_rank: int = 0,
          augment_fn=None, teacher=None, on_epoch_end=None) -> dict:
    """Train the student described by ``cfg`` on ``arrays`` (``input:<name>``, ``labels`` with -1
    for none, optional ``teacher_logits``/``teacher_feats``). Returns ``state`` (the student's
    state_dict), per-epoch ``losses``, ``coverage`` of the first epoch run, ``resumed_from``."""
    t0 = time.perf_counter()
    distributed = world > 1
    device = torch.device(f"cuda:{local_rank}" if cfg["cuda"] else "cpu")
    if cfg["cuda"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_det, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _train(cfg, arrays, rank, world, device, distributed, augment_fn, teacher, on_epoch_end, t0)
    finally:
        torch.use_deterministic_algorithms(was_det)
        torch.set_num_threads(was_threads)


class _Parts(NamedTuple):
    """What one training run holds: the student (and hint regressor), the module the steps run
    (``DistributedDataParallel`` around the trainee with several processes), optimizer, schedule
    and the sampler of this process's share."""

    student: nn.Module
    regressor: nn.Module | None
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    sampler: DistributedSampler
    steps: int  # per epoch
    per_rank: int  # samples per step in this process


def _train(cfg, arrays, rank, world, device, distributed, augment_fn, teacher, on_epoch_end, t0) -> dict:
    import torch.distributed as dist

    data = _tensors(cfg, arrays)
    if cfg["online_teacher"] and teacher is None:
        teacher = make_teacher(cfg["teacher"], threads=1)
    parts = _parts(cfg, len(data["y"]), rank, world, device, distributed)
    ckpt = Path(cfg["checkpoint"])
    start, losses, resumed_from = _resume(cfg, ckpt, parts)
    augment = _augmenter(cfg, augment_fn)
    coverage = None
    bar = progress(total=(cfg["epochs"] - start) * parts.steps, desc="distill" if not distributed else
                   f"distill x{world}", unit="step") if rank == 0 else None
    for epoch in range(start, cfg["epochs"]):
        parts.sampler.set_epoch(epoch)
        torch.manual_seed(cfg["seed"] + 1000 + epoch)  # any randomness inside the student (dropout)
        order = torch.tensor(list(iter(parts.sampler)), dtype=torch.int64)
        if coverage is None:
            coverage = _coverage(order, len(data["y"]), world, distributed)
        total = _epoch(cfg, data, parts, order, epoch, rank, device, augment, teacher, bar)
        if distributed:
            dist.all_reduce(total)
        losses.append(round(float(total[0] / total[1]), 6))
        if rank == 0:
            _save(ckpt, {"fingerprint": cfg["fingerprint"], "epoch": epoch + 1, "losses": losses,
                         "student": _state(parts.student),
                         "regressor": None if parts.regressor is None else parts.regressor.state_dict(),
                         "optimizer": parts.opt.state_dict(), "scheduler": parts.sched.state_dict()})
        if distributed:
            dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    if bar is not None:
        bar.close()
    state = _state(parts.student)
    if start >= cfg["epochs"]:  # the checkpoint was already complete
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["student"]
    return {"state": state, "losses": losses, "coverage": coverage, "resumed_from": resumed_from,
            "backend": ("nccl" if cfg["cuda"] else "gloo") if distributed else None, "world": world,
            "seconds": round(time.perf_counter() - t0, 3)}


def _state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _tensors(cfg: dict, arrays: dict[str, np.ndarray]) -> dict:
    """``x`` (inputs by name), ``y`` (labels, -1 for none) and the precomputed teacher targets
    ``t_logits``/``t_feats`` (None when absent) as tensors."""

    def optional(key):
        a = arrays.get(key)
        return None if a is None else torch.from_numpy(np.asarray(a, np.float32))

    x = {n: torch.from_numpy(np.ascontiguousarray(arrays[f"input:{n}"])) for n in cfg["input_names"]}
    return {"x": x, "y": torch.from_numpy(np.asarray(arrays["labels"], np.int64)),
            "t_logits": optional("teacher_logits"), "t_feats": optional("teacher_feats")}


def _parts(cfg: dict, n_samples: int, rank: int, world: int, device, distributed: bool) -> _Parts:
    seed = cfg["seed"]
    student = build_student(cfg["student"], cfg["width"], cfg["classes"], seed)
    regressor = None
    if cfg["hint_weight"] > 0:
        torch.manual_seed(seed + 1)
        regressor = nn.Linear(cfg["s_feat_dim"], cfg["t_feat_dim"])
    trainee = _Trainee(student, regressor).to(device)
    model = trainee
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(trainee, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(trainee.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    per_rank = cfg["batch"] // world
    sampler = DistributedSampler(range(n_samples), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    steps = math.ceil(len(sampler) / per_rank)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps)
    return _Parts(student, regressor, model, opt, sched, sampler, steps, per_rank)


def _resume(cfg: dict, ckpt: Path, parts: _Parts) -> tuple[int, list, int | None]:
    """(first epoch to run, the losses so far, the epoch resumed after or None), loading the
    checkpoint of the same run into ``parts``."""
    if not (cfg.get("resume") and ckpt.is_file()):
        return 0, [], None
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    if ck.get("fingerprint") != cfg["fingerprint"]:
        return 0, [], None
    parts.student.load_state_dict(ck["student"])
    if parts.regressor is not None and ck.get("regressor") is not None:
        parts.regressor.load_state_dict(ck["regressor"])
    parts.opt.load_state_dict(ck["optimizer"])
    parts.sched.load_state_dict(ck["scheduler"])
    return int(ck["epoch"]), list(ck["losses"]), int(ck["epoch"])


def _epoch(cfg, data, parts: _Parts, order, epoch, rank, device, augment, teacher, bar) -> torch.Tensor:
    """One epoch of steps over this process's ``order``; returns (loss sum, samples) in float64."""
    names, seed = cfg["input_names"], cfg["seed"]
    x, y = data["x"], data["y"]
    first_float = next((n for n in names if x[n].dtype.is_floating_point), None)
    shifts = None
    if cfg.get("augment") == "shift":
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        shifts = torch.randint(-1, 2, (len(y), 2), generator=g)  # per sample: split-independent
    parts.model.train()
    total = torch.zeros(2, dtype=torch.float64)
    for step in range(parts.steps):
        idx = order[step * parts.per_rank:(step + 1) * parts.per_rank]
        xb = {n: x[n][idx] for n in names}
        if first_float is not None and shifts is not None:
            xb[first_float] = shift_images(torch, xb[first_float], shifts[idx])
        elif first_float is not None and augment is not None:
            gen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1009 + step) * 131 + rank)
            xb[first_float] = augment(xb[first_float], gen)
        tl, tf = _teacher_batch(cfg, data, idx, xb, teacher)
        out = parts.model(*(xb[n].to(device) for n in names))
        logits, proj = out if parts.regressor is not None else (out, None)
        loss = _loss(cfg, logits, proj, y[idx].to(device), tl, tf, device)
        parts.opt.zero_grad(set_to_none=True)
        loss.backward()
        parts.opt.step()
        parts.sched.step()
        total += torch.tensor([loss.detach().item() * len(idx), len(idx)], dtype=torch.float64)
        if bar is not None:
            bar.update(1)
    return total


def _teacher_batch(cfg: dict, data: dict, idx, xb: dict, teacher) -> tuple:
    """The teacher's (logits, features) for a batch: run on its (augmented) view, or the precomputed
    targets; (None, None) when the loss does not use the teacher."""
    if not (cfg["alpha"] < 1 or cfg["hint_weight"] > 0):
        return None, None
    if cfg["online_teacher"]:
        tl_np, tf_np = teacher({n: xb[n].numpy() for n in cfg["input_names"]})
        return torch.from_numpy(tl_np), None if tf_np is None else torch.from_numpy(tf_np)
    t_logits, t_feats = data["t_logits"], data["t_feats"]
    return (t_logits[idx] if t_logits is not None else None), (t_feats[idx] if t_feats is not None else None)


def _loss(cfg: dict, logits, proj, yb, tl, tf, device) -> torch.Tensor:
    """``(1 - alpha) * T^2 * KL`` on the teacher's logits + ``alpha *`` cross-entropy on the
    labelled samples + ``hint_weight *`` MSE of the projected features."""
    temp, alpha, hint_w = cfg["temperature"], cfg["alpha"], cfg["hint_weight"]
    loss = torch.zeros((), device=device)
    if alpha < 1 and tl is not None:
        kd = F.kl_div(F.log_softmax(logits / temp, dim=1), F.softmax(tl.to(device) / temp, dim=1),
                      reduction="batchmean") * (temp * temp)
        loss = loss + (1 - alpha) * kd
    lab = yb >= 0
    if alpha > 0 and bool(lab.any()):
        loss = loss + alpha * F.cross_entropy(logits[lab], yb[lab])
    if proj is not None and tf is not None:
        loss = loss + hint_w * F.mse_loss(proj, tf.to(device))
    return loss


def _coverage(order: torch.Tensor, n: int, world: int, distributed: bool) -> dict:
    """Which samples each process gets in one epoch: the union must be every sample."""
    mine = order.tolist()
    if distributed:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    seen = set()
    for p in parts:
        seen.update(p)
    return {"samples": n, "per_process": [len(p) for p in parts], "distinct": len(seen),
            "repeated": sum(len(p) for p in parts) - len(seen), "all_seen": len(seen) == n}


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    argv = sys.argv[1:] if argv is None else argv
    job = Path(argv[0])
    cfg = json.loads((job / "job.json").read_text())
    with np.load(job / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if cfg["cuda"]:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cfg["cuda"] else "gloo")
    try:
        result = train(cfg, arrays, rank, world, local_rank=local_rank)
        if rank == 0:
            result.pop("state")
            atomic_write_bytes(job / "result.json", json.dumps(result, sort_keys=True).encode())
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
