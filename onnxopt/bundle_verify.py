"""Checking an edge bundle: safe unpacking, then :func:`verify_bundle`.

Unpacking is safe: every entry is checked before anything is written (a plain relative path with
no ``..``, a regular file or folder -- no links, devices or fifos -- under a member-count and size
cap, no duplicates), then extracted with tarfile's ``data`` filter as a second line.

Verifying reads the manifest, checks the sha256 of every listed file and that no file is
unlisted, then loads each model (ONNX and ORT format) in ONNX Runtime and runs the stored smoke
inputs against the stored outputs. :func:`_verify_root` never raises on a failed check (the
report lists them); :func:`_raise_if_failed` turns a failed report into
:class:`~onnxopt.errors.VerificationFailed`. :mod:`onnxopt.bundle_runtime` opens a bundle
through the same two. The public API is :mod:`onnxopt.bundle`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import external_locations
from .bundle_format import FORMAT, FORMAT_VERSION, MANIFEST, MODEL_DATA, SMOKE, _compare, _try_session
from .errors import BadInput, VerificationFailed, first_line

# Caps against archive bombs, checked on each tar header before its data is read. A model is
# below 2 GiB (protobuf's limit), and a bundle holds it at most twice (ONNX and ORT format).
MAX_MEMBERS = 64
MAX_MEMBER_BYTES = 2**31
MAX_DATA_BYTES = 2**36  # model.onnx.data, the weights of a model over 2 GiB: up to 64 GiB
MAX_TOTAL_BYTES = MAX_DATA_BYTES + 3 * 2**31

_DAMAGED = "the bundle was damaged or edited; re-pack it"


# --------------------------------------------------------------------------------------------
# safe unpacking


def _check_name(name: str) -> str | None:
    """Why ``name`` is not a plain relative path inside the bundle folder (None when it is)."""
    if not name or "\x00" in name:
        return "has an empty or NUL name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if "\\" in name:
        return "has a backslash in its path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return "has '..' in its path (it would land outside the bundle folder)"
    if not parts:
        return "names the bundle folder itself"
    return None


def _normal(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _safe_members(tf: tarfile.TarFile, archive: str) -> list[tarfile.TarInfo]:
    """Every member, each checked from its header before the next is read (so an archive bomb is
    stopped at its first oversized claim, without inflating it)."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    hint = "refusing to unpack it; bundles made by onnxopt pack hold plain files only"
    for m in tf:
        if len(members) >= MAX_MEMBERS:
            raise BadInput(archive, f"has more than {MAX_MEMBERS} entries (entry '{m.name}' is one too many)", hint)
        why = _check_name(m.name)
        if why:
            raise BadInput(archive, f"unsafe entry '{m.name}': {why}", hint)
        if m.issym() or m.islnk():
            raise BadInput(archive, f"unsafe entry '{m.name}': is a {'symbolic' if m.issym() else 'hard'} link "
                           f"(to '{m.linkname}')", hint)
        if m.ischr() or m.isblk() or m.isfifo():
            raise BadInput(archive, f"unsafe entry '{m.name}': is a {'fifo' if m.isfifo() else 'device file'}", hint)
        if not (m.isreg() or m.isdir()):
            raise BadInput(archive, f"unsafe entry '{m.name}': is not a regular file or folder", hint)
        cap = MAX_DATA_BYTES if _normal(m.name) == MODEL_DATA else MAX_MEMBER_BYTES
        if m.size > cap:
            raise BadInput(archive, f"entry '{m.name}' claims {m.size:,} bytes, over the {cap:,}-byte "
                           "limit per file", hint)
        total += m.size
        if total > MAX_TOTAL_BYTES:
            raise BadInput(archive, f"entry '{m.name}' takes the unpacked size over the {MAX_TOTAL_BYTES:,}-byte "
                           "limit", hint)
        key = _normal(m.name)
        if key in seen:
            raise BadInput(archive, f"entry '{m.name}' appears twice (the second would overwrite the first)", hint)
        seen.add(key)
        members.append(m)
    return members


def _extract(archive: Path, target: Path) -> None:
    """Unpack ``archive`` into the (empty) folder ``target`` after checking every entry."""
    where = str(archive)
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = _safe_members(tf, where)
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+/3.11.4+: a second line of defence
                tf.extractall(target, members=members, filter="data")
            else:
                for m in members:  # only regular files and folders passed the checks above
                    dest = target / _normal(m.name)
                    if m.isdir():
                        dest.mkdir(parents=True, exist_ok=True)
                        continue
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tf.extractfile(m) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise BadInput(where, f"is not a readable .tar.gz bundle ({first_line(e)})",
                       "is the file truncated or not a bundle?") from None
    except OSError as e:
        raise BadInput(where, f"cannot unpack it ({e.strerror or first_line(e)})") from None


@contextlib.contextmanager
def _materialized(path: Path):
    """The bundle as a folder: an archive unpacked into a temp folder (removed after), or a
    folder given as is."""
    if not path.exists():
        raise BadInput(str(path), "no such file")
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="onnxopt-bundle-") as tmp:
        _extract(path, Path(tmp))
        yield Path(tmp)


# --------------------------------------------------------------------------------------------
# manifest


def _read_manifest(root: Path, where: str) -> dict:
    p = root / MANIFEST
    if p.is_symlink():
        raise BadInput(where, f"unsafe entry '{MANIFEST}': is a symbolic link")
    if not p.is_file():
        raise BadInput(where, f"is not an onnxopt bundle (no {MANIFEST})", "make one with onnxopt pack")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise VerificationFailed(where, f"{MANIFEST} is not valid JSON ({type(e).__name__})", _DAMAGED) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BadInput(where, f"is not an onnxopt bundle ({MANIFEST} has no format '{FORMAT}')")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > FORMAT_VERSION:
        raise BadInput(where, f"is bundle format {m.get('format_version')}; this onnxopt reads up to {FORMAT_VERSION}",
                       "upgrade onnxopt")
    for key, typ in (("files", dict), ("model", dict), ("smoke", dict), ("io", dict)):
        if not isinstance(m.get(key), typ):
            raise VerificationFailed(where, f"{MANIFEST} is incomplete (no '{key}')", _DAMAGED)
    for n, spec in m["files"].items():
        why = _check_name(n)
        if why or n == MANIFEST:
            raise BadInput(where, f"{MANIFEST} lists an unsafe file '{n}': {why or 'the manifest itself'}")
        if not (isinstance(spec, dict) and isinstance(spec.get("sha256"), str) and isinstance(spec.get("bytes"), int)):
            raise VerificationFailed(where, f"{MANIFEST} has no sha256/bytes for '{n}'", _DAMAGED)
    smoke = m["smoke"]
    ok = (isinstance(smoke.get("inputs"), list) and isinstance(smoke.get("outputs"), list)
          and all(isinstance(i, dict) and {"name", "key"} <= set(i) for i in smoke["inputs"])
          and all(isinstance(o, dict) and {"name", "key", "rtol", "atol"} <= set(o) for o in smoke["outputs"])
          and isinstance(m["model"].get("onnx"), str))
    if not ok:
        raise VerificationFailed(where, f"{MANIFEST} is incomplete (its 'smoke' or 'model' entry is malformed)",
                                 _DAMAGED)
    return m


# --------------------------------------------------------------------------------------------
# verify


@dataclass(frozen=True)
class _StoredSmoke:
    """The smoke check stored in the bundle: the manifest's ``smoke`` and, when smoke.npz could
    be read, its inputs (by input name) and expected outputs (in the manifest's order)."""

    meta: dict
    feeds: dict | None
    expected: list | None


def _verify_root(root: Path, where: str) -> tuple[dict, dict]:
    """(report, manifest) for an unpacked bundle; never raises on a failed check,
    the report's ``failures`` list them."""
    m = _read_manifest(root, where)
    unexpected = _unlisted_files(root, m, where)
    files_report, ok_files, failures = _check_hashes(root, m)
    for rel in unexpected:
        files_report.append({"file": rel, "status": "unexpected"})
        failures.append(f"{rel}: not listed in the manifest")
    smoke = _read_smoke(root, m["smoke"], ok_files, failures)
    models_report = []
    for f in [f for f in (m["model"].get("onnx"), m["model"].get("ort")) if f]:
        entry = _check_model(root, f, m, ok_files, smoke)
        if entry["status"] == "failed":
            failures.append(f"{f}: {entry['problem']}")
        models_report.append(entry)
    report = {"bundle": where, "name": m.get("name"), "passed": not failures, "failures": failures,
              "files": files_report, "models": models_report}
    return report, m


def _unlisted_files(root: Path, m: dict, where: str) -> list[str]:
    """The files under ``root`` the manifest does not list; refuses a symbolic link."""
    unexpected = []
    listed = set(m["files"]) | {MANIFEST}
    for p in sorted(root.rglob("*")):  # an unpacked archive has no links; a folder given as is might
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise BadInput(where, f"unsafe entry '{rel}': is a symbolic link", "bundles hold plain files only")
        if p.is_file() and rel not in listed:
            unexpected.append(rel)
    return unexpected


def _check_hashes(root: Path, m: dict) -> tuple[list[dict], set[str], list[str]]:
    """(a report row per listed file, the files that match their hash, the failures)."""
    failures: list[str] = []
    files_report = []
    ok_files = set()
    for n, spec in sorted(m["files"].items()):
        p = root / n
        row: dict[str, Any] = {"file": n, "expected_sha256": spec.get("sha256"), "expected_bytes": spec.get("bytes")}
        if p.is_symlink() or (p.exists() and not p.is_file()):
            row["status"] = "not a regular file"
        elif not p.exists():
            row["status"] = "missing"
        else:
            with open(p, "rb") as fh:  # streamed: a model's .data file can be gigabytes
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            row.update(sha256=digest, bytes=p.stat().st_size)
            row["status"] = "ok" if row["sha256"] == spec.get("sha256") and row["bytes"] == spec.get("bytes") \
                else "changed"
        if row["status"] == "ok":
            ok_files.add(n)
        else:
            failures.append(f"{n}: {row['status']}" + (" (sha256 does not match the manifest)"
                                                       if row["status"] == "changed" else ""))
        files_report.append(row)
    return files_report, ok_files, failures


def _read_smoke(root: Path, smoke_meta: dict, ok_files: set[str], failures: list[str]) -> _StoredSmoke:
    """The stored smoke check; a smoke.npz that passed its hash check but cannot be read adds
    to ``failures``."""
    feeds = expected = None
    smoke_file = smoke_meta.get("file", SMOKE)
    if smoke_file in ok_files:
        try:
            with np.load(root / smoke_file, allow_pickle=False) as z:
                feeds = {i["name"]: z[i["key"]] for i in smoke_meta["inputs"]}
                expected = [z[o["key"]] for o in smoke_meta["outputs"]]
        except Exception as e:  # numpy raises many types on a bad file
            failures.append(f"{smoke_file}: cannot read it ({type(e).__name__})")
    return _StoredSmoke(meta=smoke_meta, feeds=feeds, expected=expected)


def _check_model(root: Path, f: str, m: dict, ok_files: set[str], smoke: _StoredSmoke) -> dict:
    """The report entry for the model file ``f``: loaded in ONNX Runtime and run on the smoke
    inputs, when its hash check passed."""
    entry: dict[str, Any] = {"file": f}
    if f not in m["files"]:
        entry.update(status="failed", problem="not listed in the manifest's files")
    elif f not in ok_files:
        entry.update(status="skipped", problem="its hash check failed")
    elif f == m["model"].get("onnx") and m["model"].get("external_data"):
        # weights in model.onnx.data beside it: ONNX Runtime reads them through the path, and the
        # header may point at nothing else (both files passed their hash checks above)
        data = m["model"]["external_data"]
        import onnx

        locs = external_locations(onnx.load_model(str(root / f), load_external_data=False))
        if data not in ok_files:
            entry.update(status="skipped", problem=f"the hash check of {data} failed")
        elif locs != [data]:
            entry.update(status="failed", problem=f"its external data is {locs}, not the bundle's {data}")
        else:
            entry.update(_run_smoke(_try_session(str(root / f)), smoke))
    else:
        entry.update(_run_smoke(_try_session((root / f).read_bytes()), smoke))
    return entry


def _run_smoke(sess, smoke: _StoredSmoke) -> dict:
    """``status``, ``problem`` and, when it ran, ``outputs`` (one check per smoke output) for
    the session ``sess`` (or the reason there is none)."""
    if isinstance(sess, str):
        return {"status": "failed", "problem": sess}
    if smoke.feeds is None:
        return {"status": "failed", "problem": "no smoke data to check it with"}
    outputs = smoke.meta["outputs"]
    names = [o.name for o in sess.get_outputs()]
    want = [o["name"] for o in outputs]
    if {i.name for i in sess.get_inputs()} != set(smoke.feeds) or any(w not in names for w in want):
        return {"status": "failed", "problem": "its inputs/outputs differ from the manifest's"}
    try:
        got = sess.run(want, smoke.feeds)
    except Exception as e:  # ORT raises its own types on a model it loaded but cannot run
        return {"status": "failed", "problem": f"ONNX Runtime failed to run it: {first_line(e)}"}
    checks = []
    for o, e, g in zip(outputs, smoke.expected, got):
        c = _compare(e, g, float(o["rtol"]), float(o["atol"]))
        checks.append({"output": o["name"], "rtol": o["rtol"], "atol": o["atol"], **c})
    bad = [c for c in checks if not c["passed"]]
    res: dict[str, Any] = {"outputs": checks, "status": "ok" if not bad else "failed"}
    if bad:
        res["problem"] = f"smoke output '{bad[0]['output']}': {bad[0]['problem']}"
    return res


def _raise_if_failed(report: dict) -> None:
    if report["passed"]:
        return
    f = report["failures"]
    more = f" (and {len(f) - 3} more)" if len(f) > 3 else ""
    err = VerificationFailed(report["bundle"], "bundle verification failed: " + "; ".join(f[:3]) + more,
                             "the bundle was changed or damaged after packing; re-pack it", report=report)
    raise err


def verify_bundle(path: str | os.PathLike) -> dict:
    """Check a bundle (``.tar.gz`` or an unpacked folder): safe unpacking, the sha256 of every
    file, no unlisted files, and each model (ONNX and ORT format) loaded in ONNX Runtime and run on
    the smoke inputs within the stored tolerance.

    Returns the report (``passed``, ``files``, ``models``). Raises :class:`BadInput` for something
    that is not a bundle or is unsafe to unpack, and :class:`VerificationFailed` (with the report
    as ``.report``) when any check fails.
    """
    path = Path(path)
    with _materialized(path) as root:
        report, _ = _verify_root(root, str(path))
    _raise_if_failed(report)
    return report
