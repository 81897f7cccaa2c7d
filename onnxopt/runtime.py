"""ONNX Runtime sessions, made in one place so every measurement uses the same settings."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from .errors import BadInput, InternalError, MissingDependency, first_line

__all__ = ["PROVIDERS", "available_providers", "make_session", "run"]

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def ort():
    """The onnxruntime module; a clear error when neither onnxruntime nor onnxruntime-gpu is in."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency("onnxruntime", "onnxruntime", "cpu") from None
    return onnxruntime


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers ("cpu", "cuda")."""
    have = set(ort().get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in have]


def ort_reason(e: BaseException, limit: int = 200) -> str:
    """ONNX Runtime's message in words a user can act on: without the ``[ONNXRuntimeError] : 1 :
    FAIL :`` prefix, the temp path it loaded from, and the C++ source location and signature it
    quotes (``/onnxruntime_src/...h:46 void onnxruntime::...(...)``)."""
    import re

    text = " ".join(str(e).split())
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed: ?", "", text)
    text = re.sub(r"\S*onnxruntime_src\S*:\d+ (?:\S+ )?[\w:<>~]+\([^)]*\)(?: const)? ", "", text)
    text = re.sub(r"^Fatal error: ", "", text).strip()
    m = re.search(r"Opset (\d+) is under development", text)
    if m:
        text = f"opset {m.group(1)} is newer than this ONNX Runtime ({ort().__version__}) supports"
    return text[:limit] or type(e).__name__


def _failed(where: str, loading: bool, e: Exception, produced: bool):
    """ONNX Runtime failing on a file the user gave is bad input (exit 2); on a file onnxopt
    produced it is onnxopt's bug (exit 1, with the traceback)."""
    if produced:
        return InternalError(where, f"ONNX Runtime cannot {'load' if loading else 'run'} this model onnxopt "
                             f"produced: {first_line(e)}",
                             "this is a bug in onnxopt; please report it with the input model")
    what = "cannot load the model" if loading else "failed to run it on the given inputs"
    return BadInput(where, f"ONNX Runtime {what}: {ort_reason(e)}")


def make_session(model, provider: str = "cpu", threads: int | None = None, where: str = "model",
                 produced: bool = False):
    """An inference session with spinning off (several sessions interleave fairly on few cores),
    sequential execution and the requested intra-op thread count.

    ``model`` is a path, an ``onnx.ModelProto``, or the bytes of an ONNX or ORT-format model.
    ``produced``: onnxopt wrote it (see :func:`_failed`).
    """
    rt = ort()
    opts = rt.SessionOptions()
    opts.log_severity_level = 3
    opts.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = [PROVIDERS[provider]]
    if provider == "cuda":
        providers.append(PROVIDERS["cpu"])
    from .artifact import STREAM_BYTES, model_size, on_disk

    if isinstance(model, onnx.ModelProto) and model_size(model) >= STREAM_BYTES:
        # ORT takes a model of 2 GiB or more only as a file, and maps a file's external data
        # instead of copying the weights (see STREAM_BYTES)
        with on_disk(model, external=True) as p:
            return make_session(p, provider, threads, where, produced)
    if isinstance(model, onnx.ModelProto):
        src = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        src = bytes(model)
    else:
        src = str(model)
    try:
        return rt.InferenceSession(src, sess_options=opts, providers=providers)
    except Exception as e:
        err = _failed(where, True, e, produced)
        raise err from (e if produced else None)


RELEASE_FROM = 512 << 20  # below this resident size there is nothing worth a collection


def release_memory() -> None:
    """Give freed memory back to the system between the steps of a job on a big model: collect
    Python's cycles, then glibc's ``malloc_trim``. Without it, the heap keeps what a pass or a
    session freed (fragmented by many weight-sized buffers), and the next step's peak stacks on
    top: on a 410 MB encoder, 530 MB stayed held after one INT4 pass. A no-op in a process under
    :data:`RELEASE_FROM` (small models: no collection in every loop) and where the C library is
    not glibc."""
    import gc

    if _resident_bytes() < RELEASE_FROM:
        return
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):  # not Linux: assume big, let the collection run
        return RELEASE_FROM


def _malloc_trim():
    global _TRIM
    if _TRIM is False:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
            _TRIM = None
    return _TRIM


_TRIM = False
_PAGE = __import__("mmap").PAGESIZE


def run(session, feeds: dict[str, np.ndarray], where: str = "model", produced: bool = False) -> list[np.ndarray]:
    try:
        return session.run(None, feeds)
    except Exception as e:
        err = _failed(where, False, e, produced)
        raise err from (e if produced else None)


def cpu_int8_saturates() -> bool:
    """Does this CPU's INT8 GEMM saturate on full-range U8S8 products? On x86 without VNNI
    (AVX2 and plain AVX-512), ONNX Runtime's MLAS kernels add pairs of u8 x s8 products in 16 bits
    (``vpmaddubsw``), which overflow for 8-bit weights; 7-bit weights (``reduce_range``) fit.
    VNNI/AMX CPUs and ARM accumulate in 32 bits. Read from ``/proc/cpuinfo`` (Linux); elsewhere
    assume a modern CPU."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    if not flags:
        return False
    have = set(flags.split(":", 1)[-1].split())
    return not have & {"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"}

