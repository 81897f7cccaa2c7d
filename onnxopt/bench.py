"""Side-by-side latency, throughput, size, memory and accuracy of several models in one run.

On a shared machine only ratios measured together are stable, so every variant is timed in the
same run, interleaved: round-robin blocks, each opened by an untimed re-warm run, until the time
budget is spent. Sessions are made with thread spinning off (``runtime.make_session``): with
spinning on, a session's idle workers keep burning the cores the next variant needs, which on
two cores skews ratios by up to a third.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ._version import __version__
from .artifact import GZIP_UP_TO, external_locations, io_signature, load_model, read_sidecar
from .errors import BadInput, check_choice, first_line
from .evaluate import agreement, top1
from .feeds import (Dataset, cast_feeds, check_activation_memory, check_dataset, first_feeds, load_dataset,
                    random_feeds)
from .progress import progress
from .runtime import available_providers, make_session, ort, run

__all__ = ["BenchSettings", "bench", "file_sizes", "speed_ratio"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSettings:
    """How to time. ``duration`` is seconds of timed work per (provider, threads, batch)
    configuration, shared by all variants; at least ``min_rounds`` round-robin rounds run."""

    batches: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = ()
    providers: tuple[str, ...] = ("auto",)
    duration: float = 3.0
    warmup: int = 5
    min_rounds: int = 10
    seq: int = 128
    memory: bool = True
    seed: int = 0

    def __post_init__(self):
        if not self.batches or any(int(b) < 1 for b in self.batches):
            raise BadInput("--batch", "batch sizes must be >= 1")
        if any(int(t) < 1 for t in self.threads):
            raise BadInput("--threads", "thread counts must be >= 1")
        for p in self.providers:
            check_choice(p, ("auto", "cpu", "cuda"), "--provider")
        if not (isinstance(self.duration, (int, float)) and math.isfinite(self.duration) and self.duration > 0):
            raise BadInput("--duration", f"must be a number of seconds > 0, got {self.duration!r}")
        if self.warmup < 0 or self.min_rounds < 1:
            raise BadInput("--warmup", "warm-up must be >= 0 and rounds >= 1")
        if self.seq < 1:
            raise BadInput("--seq-len", "must be >= 1")

    def thread_counts(self) -> tuple[int, ...]:
        return tuple(self.threads) or (os.cpu_count() or 1,)

    def provider_list(self) -> tuple[list[str], list[str]]:
        """(providers to run, providers skipped with a reason)."""
        have = available_providers()
        wanted: list[str] = []
        for p in self.providers:
            wanted += ["cpu", "cuda"] if p == "auto" else [p]
        run_, skipped = [], []
        for p in dict.fromkeys(wanted):
            (run_ if p in have else skipped).append(p)
        if "auto" in self.providers and "cuda" in skipped:
            skipped.remove("cuda")  # auto means "cuda if present": nothing to report
        return run_, skipped


def file_sizes(path: str | Path) -> dict:
    """Bytes on disk (model plus external data files next to it) and gzip-compressed bytes."""
    p = Path(path)
    files = [p] + [p.parent / loc for loc in external_locations(onnx.load(str(p), load_external_data=False))]
    raw = sum(f.stat().st_size for f in files)
    if raw >= GZIP_UP_TO:  # minutes of gzip and a copy of the weights for a number nobody ships by
        return {"size_bytes": raw, "size_gz_bytes": None}
    data = b"".join(f.read_bytes() for f in files)
    return {"size_bytes": raw, "size_gz_bytes": len(gzip.compress(data, compresslevel=6, mtime=0))}


@dataclass
class _Variant:
    name: str
    kind: str  # "onnx" or "torch"
    path: str | None
    model: onnx.ModelProto | None = None
    torch_module: object = None
    torch_inputs: tuple[str, ...] = ()
    sizes: dict = field(default_factory=dict)
    session: object = None
    load_ms: float | None = None

    def run_once(self, feeds):
        if self.kind == "onnx":
            return self.session.run(None, feeds)
        import torch

        args = tuple(torch.from_numpy(feeds[n]) for n in self.torch_inputs)
        with torch.inference_mode():
            out = self.torch_module(*args)
        if isinstance(out, (tuple, list)):
            return [o.numpy() for o in out]
        return [out.numpy()]


def _names(paths: list[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [str(Path(p).with_suffix("")) for p in paths]


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort().__version__, "onnxopt": __version__,
            "providers": available_providers()}


def _percentiles(lat_s: list[float], batch: int) -> dict:
    a = np.asarray(lat_s) * 1000.0
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "throughput": float(batch * 1000.0 / a.mean()),
        "runs": int(a.size),
    }


def _time_interleaved(variants: list[_Variant], feeds, settings: BenchSettings, desc: str) -> dict[str, list[float]]:
    """Round-robin blocks; each block starts with an untimed run so a variant never pays for the
    previous one's cache and thread state. Every other round runs the variants in reverse order
    (A B, B A, ...), so that neither always runs first after a switch or while the machine drifts."""
    for v in variants:
        for _ in range(settings.warmup):
            v.run_once(feeds)
    # Size blocks so each takes about the same time (~50 ms, at least one run).
    per_run = {}
    for v in variants:
        t0 = time.perf_counter()
        v.run_once(feeds)
        per_run[v.name] = max(time.perf_counter() - t0, 1e-6)
    block = {n: max(1, int(0.05 / t)) for n, t in per_run.items()}
    lat: dict[str, list[float]] = {v.name: [] for v in variants}
    budget = settings.duration
    spent = 0.0
    rounds = 0
    est_round = sum(per_run[v.name] * (block[v.name] + 1) for v in variants)
    planned = max(settings.min_rounds, int(budget / max(est_round, 1e-6)))
    bar = progress(total=planned, desc=desc, unit="round")
    while rounds < settings.min_rounds or spent < budget:
        for v in (variants if rounds % 2 == 0 else variants[::-1]):
            v.run_once(feeds)  # re-warm after the switch, untimed
            for _ in range(block[v.name]):
                t0 = time.perf_counter()
                v.run_once(feeds)
                dt = time.perf_counter() - t0
                lat[v.name].append(dt)
                spent += dt
        rounds += 1
        bar.update(1)
        if rounds > 100000:
            break
    bar.close()
    return lat


def speed_ratio(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray], *,
                seconds: float = 1.0, threads: int | None = None, provider: str = "cpu") -> dict:
    """A quick side-by-side timing of two in-memory models (interleaved as :func:`bench` does):
    ``{"reference_p50_ms", "candidate_p50_ms", "speedup"}`` (> 1: the candidate is faster).
    Used by jobs that must refuse a variant slower than its reference."""
    vs = [_Variant(name, "onnx", None, m, session=make_session(m, provider, threads, name,
                                                               produced=name == "candidate"))
          for name, m in (("reference", reference), ("candidate", candidate))]
    lat = _time_interleaved(vs, feeds, BenchSettings(duration=seconds, warmup=3, min_rounds=5, memory=False),
                            "speed check")
    p50 = {k: float(np.median(v)) * 1000.0 for k, v in lat.items()}
    return {"reference_p50_ms": round(p50["reference"], 4), "candidate_p50_ms": round(p50["candidate"], 4),
            "speedup": round(p50["reference"] / p50["candidate"], 3), "seconds": seconds,
            "provider": provider}


def _memory(path: str, feeds: dict[str, np.ndarray], threads: int) -> float | None:
    if not sys.platform.startswith("linux"):
        return None
    with tempfile.TemporaryDirectory() as td:
        fp = os.path.join(td, "feeds.npz")
        np.savez(fp, **feeds)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        try:
            out = subprocess.run([sys.executable, "-m", "onnxopt._memprobe", path, fp, str(threads)],
                                 capture_output=True, text=True, timeout=600, env=env)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
        except Exception:  # measuring memory is best-effort; never fail a benchmark on it
            logger.warning("peak memory of %s could not be measured", path)
            return None
    if rec.get("hwm_kb") is None or rec.get("rss_before_kb") is None:
        return None
    return max(0.0, (rec["hwm_kb"] - rec["rss_before_kb"]) / 1024.0)


@dataclass
class _BenchPlan:
    """What one :func:`bench` run resolved from its arguments, shared by its stages."""

    settings: BenchSettings
    paths: list[str]
    protos: list[onnx.ModelProto]
    variants: list[_Variant]
    task: str | None
    classification: bool | None
    dataset: Dataset | None
    providers: list[str]
    skipped: list[str]
    memory_checked: set = field(default_factory=set)  # batch sizes whose activations were sized


def _check_same_inputs(paths: list[str], protos: list[onnx.ModelProto]) -> None:
    ref_sig = io_signature(protos[0])
    ref_inputs = [(i["name"], i["dtype"]) for i in ref_sig["inputs"]]
    for p, m in zip(paths[1:], protos[1:]):
        sig = [(i["name"], i["dtype"]) for i in io_signature(m)["inputs"]]
        if sig != ref_inputs:
            raise BadInput(p, f"has inputs {sig}, but the reference {paths[0]} has {ref_inputs}",
                           "side-by-side benchmarks need models with the same inputs")


def _plan(models: list[str | Path], settings: BenchSettings, data: str | Dataset | None,
          torch_ref: str | None, names: list[str] | None) -> _BenchPlan:
    """Load and check the models, the dataset and the providers; build the variants to time."""
    if not models:
        raise BadInput("bench", "no models given")
    paths = [str(m) for m in models]
    protos = [load_model(p) for p in paths]
    names = list(names) if names else _names(paths)
    _check_same_inputs(paths, protos)
    # The task decides the agreement metric (top-1 for classifiers, cosine for embeddings); a
    # file exported by onnxopt says it in its sidecar, a bare file falls back to a guess.
    task = (read_sidecar(paths[0]) or {}).get("task")
    classification = None if task is None else task == "classification"
    dataset = load_dataset(data, protos[0]) if isinstance(data, str) else data
    if dataset is not None:
        check_dataset(protos[0], dataset)
    variants = [_Variant(n, "onnx", p, m, sizes=file_sizes(p)) for n, p, m in zip(names, paths, protos)]
    if torch_ref:
        from .sources import resolve

        spec = resolve(torch_ref)
        net = spec.build()
        variants.append(_Variant(f"{spec.name} (PyTorch eager)", "torch", None, torch_module=net,
                                 torch_inputs=tuple(i.name for i in spec.inputs)))
    providers, skipped = settings.provider_list()
    if not providers:
        raise BadInput("--provider", f"{', '.join(skipped)} is not available in this onnxruntime build",
                       "install onnxruntime-gpu for CUDA (see README), or use --provider cpu")
    for p in skipped:
        logger.warning("provider %s is not available in this onnxruntime build; skipped", p)
    return _BenchPlan(settings, paths, protos, variants, task, classification, dataset, providers, skipped)


def _random_feeds(plan: _BenchPlan, batch: int) -> dict[str, np.ndarray]:
    s = plan.settings
    return random_feeds(plan.protos[0], batch, s.seq, s.seed, plan.paths[0])


def _batch_feeds(plan: _BenchPlan, batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` dataset samples when there are enough (per-sample data: its first
    sample, at batch 1), else random inputs; their activations sized once per batch size (the
    same feeds come back for every provider and thread count)."""
    feeds = first_feeds(plan.protos[0], plan.dataset, batch)
    feeds = feeds if feeds is not None else _random_feeds(plan, batch)
    if batch not in plan.memory_checked:
        check_activation_memory(plan.protos[0], feeds, plan.paths[0])
        plan.memory_checked.add(batch)
    return feeds


def _first_outputs(runnable: list[_Variant], feeds) -> dict[str, list]:
    """One untimed run of each variant: its outputs, and a clear error for one that fails."""
    outs = {}
    for v in runnable:
        try:
            outs[v.name] = v.run_once(feeds)
        except Exception as e:
            raise BadInput(v.path or v.name, f"fails on the benchmark inputs: "
                           f"{first_line(e)}") from None
    return outs


def _timing_rows(plan: _BenchPlan, runnable: list[_Variant], outs: dict[str, list],
                 lat: dict[str, list[float]], config: dict) -> list[dict]:
    """One row per variant of one (provider, threads, batch) ``config``: latency, ratio to the
    reference, sizes and (not for the reference) agreement with the reference's outputs."""
    rows = []
    ref_p50 = None
    for v in runnable:
        stats = _percentiles(lat[v.name], config["batch"])
        if ref_p50 is None:
            ref_p50 = stats["p50_ms"]
        row = {"model": v.name, "kind": v.kind, "path": v.path, **config, **stats,
               "speedup": ref_p50 / stats["p50_ms"],
               "load_ms": v.load_ms if v.kind == "onnx" else None, **v.sizes}
        if v is not runnable[0]:
            row["agreement"] = agreement(outs[runnable[0].name][0], outs[v.name][0], plan.classification)
        rows.append(row)
    return rows


def _time_configuration(plan: _BenchPlan, provider: str, threads: int) -> list[dict]:
    """Rows of one (provider, threads) configuration: fresh sessions, then every batch size."""
    for v in plan.variants:
        if v.kind == "onnx":
            t0 = time.perf_counter()
            v.session = make_session(v.path, provider, threads, v.path)
            v.load_ms = (time.perf_counter() - t0) * 1000.0
    runnable = [v for v in plan.variants if v.kind == "onnx" or provider == "cpu"]
    if any(v.kind == "torch" for v in runnable):
        import torch

        torch.set_num_threads(threads)
    rows: list[dict] = []
    for batch in plan.settings.batches:
        feeds = _batch_feeds(plan, batch)
        outs = _first_outputs(runnable, feeds)
        lat = _time_interleaved(runnable, feeds, plan.settings, f"{provider} t{threads} b{batch}")
        rows += _timing_rows(plan, runnable, outs, lat,
                             {"provider": provider, "threads": threads, "batch": batch})
    return rows


def _add_accuracy_and_memory(plan: _BenchPlan, rows: list[dict]) -> None:
    """Accuracy and memory do not depend on the timing configuration: measure once per variant
    and add the results to every row of that variant."""
    settings = plan.settings
    accuracy: dict[str, dict] = {}
    if plan.dataset is not None:
        for v in plan.variants:
            accuracy[v.name] = _dataset_accuracy(v, plan.protos[0], plan.dataset)
    memory: dict[str, float | None] = {}
    if settings.memory:
        feeds = _batch_feeds(plan, settings.batches[0])
        for v in progress(plan.variants, desc="peak memory", unit="model"):
            if v.kind == "onnx":
                memory[v.name] = _memory(v.path, feeds, settings.thread_counts()[0])
    for row in rows:
        if row["model"] in accuracy:
            row.update(accuracy[row["model"]])
        row["peak_mem_mb"] = memory.get(row["model"])


def _report(plan: _BenchPlan, rows: list[dict]) -> dict:
    dataset = plan.dataset
    return {
        "kind": "bench",
        "reference": plan.variants[0].name,
        "machine": _machine(),
        "task": plan.task,
        "settings": {**asdict(plan.settings), "providers_run": plan.providers, "providers_skipped": plan.skipped,
                     "dataset": dataset.name if dataset is not None else None},
        "rows": rows,
    }


def bench(
    models: list[str | Path],
    *,
    settings: BenchSettings | None = None,
    data: str | Dataset | None = None,
    torch_ref: str | None = None,
    names: list[str] | None = None,
) -> dict:
    """Benchmark ONNX files side by side; the first is the reference for ratios and agreement.

    ``data``: a labelled dataset (``"digits"`` or an ``.npz``) for accuracy; without it, outputs
    are compared with the reference's. ``torch_ref``: a built-in model name or factory whose
    PyTorch eager forward is timed as an extra row. Returns the report dict (``report.py``
    renders it as a table, markdown or JSON).
    """
    settings = settings or BenchSettings()
    plan = _plan(models, settings, data, torch_ref, names)
    rows: list[dict] = []
    for provider in plan.providers:
        for threads in settings.thread_counts():
            rows += _time_configuration(plan, provider, threads)
    _add_accuracy_and_memory(plan, rows)
    return _report(plan, rows)


def _dataset_accuracy(v: _Variant, ref_model: onnx.ModelProto, dataset: Dataset) -> dict:
    """Top-1 accuracy of one variant over the whole labelled dataset (batches of 64)."""
    if dataset.labels is None:
        return {}
    sess = make_session(v.path, "cpu", None, v.path) if v.kind == "onnx" else None
    outs = []
    for feeds, _ in dataset.batches(64):
        feeds = cast_feeds(ref_model, feeds)
        outs.append(run(sess, feeds, v.path)[0] if sess is not None else v.run_once(feeds)[0])
    out = np.concatenate(outs)
    if dataset.labels is None or out.ndim != 2:
        return {}
    return {"accuracy": top1(out, dataset.labels)}
