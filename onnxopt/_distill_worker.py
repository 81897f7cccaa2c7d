"""The training loop of :mod:`onnxopt.distill`, in one process or as a DDP worker.

``train(cfg, arrays, rank, world)`` is the loop; :func:`onnxopt.distill.distill` calls it directly
for one process. For ``nproc > 1`` it launches ``python -m torch.distributed.run --standalone
--nproc-per-node N -m onnxopt._distill_worker JOB``; :func:`main` then joins the process group
(``gloo`` on CPU, ``nccl`` on GPUs), wraps the student in ``DistributedDataParallel`` and runs the
same loop on its ``DistributedSampler`` share. Rank 0 writes the checkpoints and ``JOB/result.json``.

This module imports torch at import time; :mod:`onnxopt.distill` imports it lazily.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from onnxopt.artifact import atomic_write_bytes
from onnxopt.distill import build_student, last_linear, make_teacher, shift_images
from onnxopt.progress import progress

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


def _train(cfg, arrays, rank, world, device, distributed, augment_fn, teacher, on_epoch_end, t0) -> dict:
    import torch.distributed as dist

    names = cfg["input_names"]
    x = {n: torch.from_numpy(np.ascontiguousarray(arrays[f"input:{n}"])) for n in names}
    y = torch.from_numpy(np.asarray(arrays["labels"], np.int64))
    n_samples = len(y)
    t_logits = arrays.get("teacher_logits")
    t_feats = arrays.get("teacher_feats")
    t_logits = None if t_logits is None else torch.from_numpy(np.asarray(t_logits, np.float32))
    t_feats = None if t_feats is None else torch.from_numpy(np.asarray(t_feats, np.float32))
    seed, temp, alpha, hint_w = cfg["seed"], cfg["temperature"], cfg["alpha"], cfg["hint_weight"]
    need_teacher = alpha < 1 or hint_w > 0
    if cfg["online_teacher"] and teacher is None:
        teacher = make_teacher(cfg["teacher"], threads=1)

    student = build_student(cfg["student"], cfg["width"], cfg["classes"], seed)
    regressor = None
    if hint_w > 0:
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

    ckpt = Path(cfg["checkpoint"])
    start, losses, resumed_from = 0, [], None
    if cfg.get("resume") and ckpt.is_file():
        ck = torch.load(ckpt, map_location="cpu", weights_only=True)
        if ck.get("fingerprint") == cfg["fingerprint"]:
            student.load_state_dict(ck["student"])
            if regressor is not None and ck.get("regressor") is not None:
                regressor.load_state_dict(ck["regressor"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start, losses, resumed_from = int(ck["epoch"]), list(ck["losses"]), int(ck["epoch"])
    augment = _augmenter(cfg, augment_fn)
    first_float = next((n for n in names if x[n].dtype.is_floating_point), None)
    coverage = None
    show = rank == 0
    bar = progress(total=(cfg["epochs"] - start) * steps, desc="distill" if not distributed else f"distill x{world}",
                   unit="step") if show else None
    for epoch in range(start, cfg["epochs"]):
        sampler.set_epoch(epoch)
        torch.manual_seed(seed + 1000 + epoch)  # any randomness inside the student (dropout)
        order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
        if coverage is None:
            coverage = _coverage(order, n_samples, world, distributed)
        shifts = None
        if cfg.get("augment") == "shift":
            g = torch.Generator().manual_seed(seed * 7919 + epoch)
            shifts = torch.randint(-1, 2, (n_samples, 2), generator=g)  # per sample: split-independent
        model.train()
        total = torch.zeros(2, dtype=torch.float64)
        for step in range(steps):
            idx = order[step * per_rank:(step + 1) * per_rank]
            xb = {n: x[n][idx] for n in names}
            if first_float is not None and shifts is not None:
                xb[first_float] = shift_images(torch, xb[first_float], shifts[idx])
            elif first_float is not None and augment is not None:
                gen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1009 + step) * 131 + rank)
                xb[first_float] = augment(xb[first_float], gen)
            tl = tf = None
            if need_teacher:
                if cfg["online_teacher"]:
                    tl_np, tf_np = teacher({n: xb[n].numpy() for n in names})
                    tl = torch.from_numpy(tl_np)
                    tf = None if tf_np is None else torch.from_numpy(tf_np)
                else:
                    tl = t_logits[idx] if t_logits is not None else None
                    tf = t_feats[idx] if t_feats is not None else None
            yb = y[idx].to(device)
            out = model(*(xb[n].to(device) for n in names))
            logits, proj = out if regressor is not None else (out, None)
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += torch.tensor([loss.detach().item() * len(idx), len(idx)], dtype=torch.float64)
            if bar is not None:
                bar.update(1)
        if distributed:
            dist.all_reduce(total)
        losses.append(round(float(total[0] / total[1]), 6))
        if rank == 0:
            _save(ckpt, {"fingerprint": cfg["fingerprint"], "epoch": epoch + 1, "losses": losses,
                         "student": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
                         "regressor": None if regressor is None else regressor.state_dict(),
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
        if distributed:
            dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    if bar is not None:
        bar.close()
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    if start >= cfg["epochs"]:  # the checkpoint was already complete
        ck = torch.load(ckpt, map_location="cpu", weights_only=True)
        state = ck["student"]
    return {"state": state, "losses": losses, "coverage": coverage, "resumed_from": resumed_from,
            "backend": ("nccl" if cfg["cuda"] else "gloo") if distributed else None, "world": world,
            "seconds": round(time.perf_counter() - t0, 3)}


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
