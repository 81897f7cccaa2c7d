"""Where independent pieces of work run: in this process (the default) or as Ray tasks.

``--executor local`` runs them one after another here. ``--executor ray`` starts a local Ray
cluster for the command; ``--executor ray:ADDRESS`` joins a running one (``ray start --head`` on
one machine, ``ray start --address=...`` on the others). Ray is the engine; this module only
maps a function over items with it:

* what every task shares (the reference model, its outputs, the calibration and gate data) is put
  in Ray's object store once (``ray.put``) and handed to each task by reference, never pickled
  into every task;
* the tasks write their files under the output folder, which every node must see at the same
  path (one machine, or a shared filesystem the user gives as ``-o``);
* results come back in the order of the items, whatever order the tasks finish in, so a Ray run
  writes the same report as the local one.

Timing is never fanned out: ratios are measured side by side on one machine (the caller's).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import BadInput, MissingDependency, OnnxoptError

__all__ = ["Executor", "parse_executor", "map_tasks", "EXECUTOR_HELP"]

EXECUTOR_HELP = ("Where candidates are built and checked: local (this process) or ray[:ADDRESS] (Ray tasks on a "
                 "local cluster, or the running cluster at ADDRESS; pip install onnxopt[ray]). Timing stays here.")


@dataclasses.dataclass(frozen=True)
class Executor:
    kind: str = "local"  # "local" | "ray"
    address: str | None = None  # for ray: None starts a local cluster for the command

    def describe(self) -> dict:
        return {"kind": self.kind, **({"address": self.address} if self.address else {})}


def parse_executor(text: str | Executor | None) -> Executor:
    """``local`` | ``ray`` | ``ray:ADDRESS`` (host:port, or ``auto`` for the cluster this machine
    belongs to) -> :class:`Executor`; anything else is a one-line BadInput."""
    if isinstance(text, Executor):
        return text
    t = (text or "local").strip()
    if t == "local":
        return Executor()
    if t == "ray":
        return Executor("ray")
    if t.startswith("ray:") and t[4:].strip():
        return Executor("ray", t[4:].strip())
    raise BadInput("--executor", f"'{text}' is not an executor", "use local, ray or ray:HOST:PORT")


def _ray():
    try:
        import ray
    except ImportError:
        raise MissingDependency("--executor ray", "ray", "ray") from None
    return ray


def _init(ray, ex: Executor) -> bool:
    """Connect (or start a local cluster); True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False,
                              "configure_logging": False}
    if ex.address is None:
        kwargs["num_cpus"] = os.cpu_count() or 1
    else:
        kwargs["address"] = ex.address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise BadInput("--executor", f"cannot reach the Ray cluster at {ex.address or 'a new local one'}: "
                       f"{str(e).splitlines()[0][:200]}",
                       "start one with 'ray start --head' and pass ray:HOST:PORT") from None
    return True


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _thread_env() -> dict[str, str]:
    """The driver's thread counts for the workers. Ray gives a 1-CPU task OMP_NUM_THREADS=1, and a
    least-squares fit or a fine-tuning run summed over another number of BLAS/torch threads gives
    other low bits: the same candidate would not be the same bytes as in a local run."""
    env = {v: os.environ[v] for v in _THREAD_VARS if v in os.environ}
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def _traced(fn: Callable, shared: Any, item: Any, cwd: str) -> tuple[Any, dict]:
    """Runs in the Ray worker, in the driver's working directory (relative paths mean the same
    there: one machine, or the shared path every node mounts alike). onnxopt's own errors come
    back as values, so the driver raises the same one-line error (and exit code) a local run would."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    where = {"pid": os.getpid(), "node": os.uname().nodename}
    try:
        return fn(shared, item), where
    except OnnxoptError as e:
        return _Raised(e), where


@dataclasses.dataclass
class _Raised:
    error: OnnxoptError


def map_tasks(ex: Executor, fn: Callable[[Any, Any], Any], items: Sequence[Any], *, shared: Any = None,
              on_done: Callable[[int, Any], None] | None = None, deadline: float | None = None,
              skipped: Callable[[Any], Any] | None = None) -> list[tuple[Any, dict | None]]:
    """``[(fn(shared, item), where_it_ran), ...]`` in the order of ``items``.

    ``on_done(i, result)`` is called as each finishes (a progress bar). ``deadline`` (a
    ``time.perf_counter()`` value): on Ray, tasks still running then are cancelled and their
    result is ``skipped(item)``; locally the caller checks its own budget inside ``fn``.
    ``where_it_ran`` is ``{"pid", "node"}`` for a Ray task, None for local work."""
    if ex.kind == "local":
        out = []
        for i, item in enumerate(items):
            out.append((fn(shared, item), None))
            if on_done:
                on_done(i, out[-1][0])
        return out
    ray = _ray()
    started = _init(ray, ex)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0, runtime_env={"env_vars": _thread_env()})(_traced)
        ref = ray.put(shared)  # once into the object store; every task reads the same copy
        futures = [remote.remote(fn, ref, item, os.getcwd()) for item in items]
        index = {f: i for i, f in enumerate(futures)}
        results: list = [None] * len(items)
        pending = list(futures)
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:  # the budget is spent: what is still running is skipped
                for f in pending:
                    ray.cancel(f, force=True)
                    i = index[f]
                    results[i] = (skipped(items[i]) if skipped else None, None)
                break
            i = index[done[0]]
            results[i] = ray.get(done[0])
            if isinstance(results[i][0], _Raised):
                for f in pending:
                    ray.cancel(f, force=True)
                raise results[i][0].error
            if on_done:
                on_done(i, results[i][0])
        return results
    finally:
        if started:
            ray.shutdown()
