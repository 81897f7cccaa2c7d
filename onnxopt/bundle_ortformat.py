"""The ORT-format model of a bundle: onnxruntime's converter, and its output made reproducible.

:func:`_convert_to_ort` runs onnxruntime's own ``convert_onnx_models_to_ort`` in a temp folder
and returns the ``.ort`` file and its required-operators config. onnxruntime writes one table of
that file (the kernel-type strings) in hash-map order, which changes from run to run;
:func:`_canonical_ort` rebuilds that table in sorted order and keeps the rest byte for byte, so a
bundle packed twice has the same bytes. Used by :mod:`onnxopt.bundle_pack`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle_format import MODEL_ONNX, MODEL_ORT, logger
from .errors import first_line

# --------------------------------------------------------------------------------------------
# convert


def _convert_to_ort(onnx_bytes: bytes) -> tuple[tuple[bytes, bytes | None, bytes] | None, dict]:
    """Run onnxruntime's ``convert_onnx_models_to_ort`` (fixed optimization style, the default
    level 'all' minus the x86-only NCHWc layouts, as the tool does for a non-amd64 target) in a
    temp folder. Returns ((ort bytes, the same made reproducible or None, required-operators
    config), info) or (None, info with the reason)."""
    level = os.getenv("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", "all")
    info: dict[str, Any] = {"tool": "onnxruntime.tools.convert_onnx_models_to_ort", "optimization_style": "Fixed",
                            "optimization_level": level}
    try:
        conv = _ort_converter()
    except ImportError as e:
        info.update(ok=False, reason=f"onnxruntime.tools is not importable ({first_line(e)})")
        return None, info
    with tempfile.TemporaryDirectory(prefix="onnxopt-ort-") as tmp:
        src = Path(tmp) / MODEL_ONNX
        src.write_bytes(onnx_bytes)
        out_dir = Path(tmp) / "out"
        log = io.StringIO()
        quiet = logging.getLogger("ort_format_model.utils")
        old_level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(log):  # the tool prints progress; our stdout is for data
                conv.convert_onnx_models_to_ort(src, output_dir=out_dir,
                                                optimization_styles=[conv.OptimizationStyle.Fixed])
            ort_file = out_dir / "model.ort"
            cfg_file = out_dir / "model.required_operators.config"
            ort_bytes = ort_file.read_bytes()
            config = cfg_file.read_text()
        except Exception as e:  # the converter raises whatever ORT raised
            logger.debug("ORT conversion output:\n%s", log.getvalue())
            info.update(ok=False, reason=f"onnxruntime's converter failed: {first_line(e)}")
            return None, info
        finally:
            quiet.setLevel(old_level)
    # The config's header names the temp path it was made from; name the bundle's file instead.
    lines = [("# - " + MODEL_ORT) if ln.startswith("# - ") else ln for ln in config.splitlines()]
    try:
        canonical = _canonical_ort(ort_bytes)
    except Exception as e:  # an ORT-format layout this code does not know: keep ORT's bytes as they are
        canonical = None
        info["not_reproducible_why"] = first_line(e)
    return (ort_bytes, canonical, ("\n".join(lines) + "\n").encode("utf-8")), info


def _ort_converter():
    """Import onnxruntime's converter module. Its logger helper calls ``logging.basicConfig`` on
    import, which would configure the root logger of a program that merely packs a bundle; undo
    that (a gap in onnxruntime.tools, which has no quieter entry point)."""
    import sys

    name = "onnxruntime.tools.convert_onnx_models_to_ort"
    if name in sys.modules:
        return sys.modules[name]
    root = logging.getLogger()
    before = list(root.handlers)
    import importlib

    mod = importlib.import_module(name)
    for h in list(root.handlers):
        if h not in before:
            root.removeHandler(h)
    return mod


# --------------------------------------------------------------------------------------------
# canonicalise


@dataclass(frozen=True)
class _OrtLayout:
    """Where the parts of an ORT-format file sit, as offsets from the start of its buffer."""

    start: int  # where the self-contained tail (the model table, or its vtable before it) begins
    model_pos: int
    version_pos: int
    resolver: Any  # the KernelTypeStrResolver table (a FlatBuffers accessor)


def _canonical_ort(buf: bytes) -> bytes:
    """The ORT-format model with its kernel-type-string table in sorted order.

    onnxruntime writes that table from a hash map whose iteration order changes from run to run
    (the rest of the file is deterministic), so two conversions of one model differ in a few
    hundred bytes. This fills that gap: the FlatBuffer is built back to front -- the version
    string, then the model, then the table, then the root -- so the model and version occupy the
    buffer's tail, self-contained (FlatBuffer offsets point forward; a table's fresh vtable sits
    right before it). The tail is kept byte for byte at the same distance from the end (so every
    alignment holds), and the table and root are rebuilt in sorted order in front of it. The
    result is checked by loading it in ONNX Runtime and running the smoke inputs.
    """
    import flatbuffers
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession as IS

    layout = _ort_layout(buf)
    entries = _sorted_kernel_type_strs(layout.resolver)
    tail = buf[layout.start:]
    b = flatbuffers.Builder(len(tail) + 1024)
    b.head = len(b.Bytes) - len(tail)
    b.Bytes[b.head:] = tail
    b.minalign = 64  # the output's size is a multiple of 64, so the tail keeps its absolute alignment
    res = _build_resolver(b, entries)
    IS.Start(b)
    IS.AddOrtVersion(b, len(buf) - layout.version_pos)
    IS.AddModel(b, len(buf) - layout.model_pos)
    IS.AddKernelTypeStrResolver(b, res)
    b.Finish(IS.End(b), file_identifier=b"ORTM")
    out = bytes(b.Output())
    if not out.endswith(tail):
        raise ValueError("the rebuilt file does not end with the model")
    return out


def _ort_layout(buf: bytes) -> _OrtLayout:
    """Check that the root table holds only the version, the model and the kernel type strings,
    and that the model and version form the buffer's tail; say where they are."""
    from flatbuffers.number_types import Int32Flags, UOffsetTFlags
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession as IS

    if buf[4:8] != b"ORTM":
        raise ValueError("not an ORT-format model")
    sess = IS.InferenceSession.GetRootAs(buf, 0)
    tab = sess._tab
    vt = tab.Pos - Int32Flags.py_type(tab.Get(Int32Flags, tab.Pos))
    n_slots = (int.from_bytes(buf[vt:vt + 2], "little") - 4) // 2
    if n_slots > 4 and any(tab.Offset(4 + 2 * i) for i in range(4, n_slots)) or tab.Offset(8):
        raise ValueError("the session table has fields besides version, model and kernel type strings")
    model, resolver = sess.Model(), sess.KernelTypeStrResolver()
    if model is None or resolver is None or sess.OrtVersion() is None:
        raise ValueError("the session table lacks its model or kernel type strings")
    model_pos = model._tab.Pos
    model_vt = model_pos - Int32Flags.py_type(model._tab.Get(Int32Flags, model_pos))
    start = min(model_pos, model_vt)
    version_pos = tab.Pos + tab.Offset(4)
    version_pos += UOffsetTFlags.py_type(tab.Get(UOffsetTFlags, version_pos))
    if version_pos < start:
        raise ValueError("the version string is not in the model's tail")
    return _OrtLayout(start=start, model_pos=model_pos, version_pos=version_pos, resolver=resolver)


def _sorted_kernel_type_strs(resolver) -> list[tuple[str, list[tuple[str, list[tuple[int, int]]]]]]:
    """The resolver's entries as ``[(op id, [(kernel type string, [(arg type, index)])])]``,
    ops and their type strings sorted (the args keep their schema order)."""
    entries = []
    for i in range(resolver.OpKernelTypeStrArgsLength()):
        e = resolver.OpKernelTypeStrArgs(i)
        kts = []
        for j in range(e.KernelTypeStrArgsLength()):
            k = e.KernelTypeStrArgs(j)
            args = [(k.Args(a).ArgType(), k.Args(a).Index()) for a in range(k.ArgsLength())]  # schema order: kept
            kts.append((k.KernelTypeStr().decode("utf-8"), args))
        entries.append((e.OpId().decode("utf-8"), sorted(kts)))
    entries.sort()
    return entries


def _offset_vector(b, offsets: list[int], start_vector) -> int:
    start_vector(b, len(offsets))
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _build_resolver(b, entries) -> int:
    """Write the KernelTypeStrResolver table for ``entries`` (in their order) into the builder
    ``b``; returns its offset."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
        ArgTypeAndIndex as ATI,
        KernelTypeStrArgsEntry as KTE,
        KernelTypeStrResolver as KTR,
        OpIdKernelTypeStrArgsEntry as OPE,
    )

    op_offsets = []
    for op_id, kts in entries:
        kt_offsets = []
        for kt, args in kts:
            arg_offsets = []
            for arg_type, index in args:
                ATI.Start(b)
                ATI.AddArgType(b, arg_type)
                ATI.AddIndex(b, index)
                arg_offsets.append(ATI.End(b))
            args_vec = _offset_vector(b, arg_offsets, KTE.StartArgsVector)
            kt_offsets.append(_named_table(b, KTE, kt, KTE.AddKernelTypeStr, args_vec, KTE.AddArgs))
        kts_vec = _offset_vector(b, kt_offsets, OPE.StartKernelTypeStrArgsVector)
        op_offsets.append(_named_table(b, OPE, op_id, OPE.AddOpId, kts_vec, OPE.AddKernelTypeStrArgs))
    ops_vec = _offset_vector(b, op_offsets, KTR.StartOpKernelTypeStrArgsVector)
    KTR.Start(b)
    KTR.AddOpKernelTypeStrArgs(b, ops_vec)
    return KTR.End(b)


def _named_table(b, table, name: str, add_name, vector: int, add_vector) -> int:
    """A ``table`` (a generated FlatBuffers module) of a string field and a vector field: the
    string is written here, then the table; ``vector`` is already in the builder."""
    name_ref = b.CreateString(name)
    table.Start(b)
    add_name(b, name_ref)
    add_vector(b, vector)
    return table.End(b)
