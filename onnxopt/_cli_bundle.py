"""``onnxopt pack`` and ``onnxopt verify-bundle``: parse, call :mod:`onnxopt.bundle`, render."""

from __future__ import annotations

import click

from ._cli_context import CONTEXT, external_data_option
from .errors import VerificationFailed

__all__ = ["pack", "verify_bundle"]


@click.command("pack", context_settings=CONTEXT)
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the bundle (.tar.gz).")
@external_data_option
@click.option("--labels", type=click.Path(), help="Text file with one class name per line, in class-index order.")
@click.option("--preprocess", type=click.Choice(["imagenet", "unit", "raw", "none"]), default="none",
              show_default=True, help="How an image becomes the model's NCHW input (recorded in the manifest, "
              "applied by onnxopt.bundle.load(...).predict): imagenet = resize/centre-crop, /255, ImageNet "
              "mean/std; unit = resize, /255; raw = resize, 0-255.")
@click.option("--ort/--no-ort", "ort_format", default=True, show_default=True,
              help="Also ship the ORT-format model and its required-operators config (mobile/minimal builds).")
@click.option("--name", help="Name recorded in the manifest [default: the model file's name].")
@click.option("--rtol", type=float, help="Relative tolerance of the smoke check [default: by dtype/quantization].")
@click.option("--atol", type=float, help="Absolute tolerance of the smoke check [default: scaled to the outputs].")
@click.option("--data", type=str, help="Real inputs whose first sample is the smoke input (an .npz or recorded "
              "feeds), for models random inputs cannot run [default: random inputs].")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest JSON.")
def pack(model, output, labels, preprocess, ort_format, name, rtol, atol, data, as_json):
    """Pack an ONNX model into a verified edge bundle (.tar.gz).

    The bundle holds the model (ONNX, and ORT format with its required-operators config), smoke
    inputs with their expected outputs, the labels, a manifest (IO, preprocessing, metrics and
    lineage from the model's sidecar, versions, sha256 of every file) and a README. Packing the
    same model twice gives the same bytes.

    \b
    Examples:
      onnxopt pack digits-int8.onnx -o digits.tar.gz --labels digits.txt --preprocess unit
      onnxopt pack resnet18.onnx -o r18.tar.gz --labels imagenet.txt --preprocess imagenet
      onnxopt pack minilm.onnx -o minilm.tar.gz --no-ort --json | jq .files
      onnxopt pack silero_vad.onnx -o vad.tar.gz --data vad-feeds.npz   # a sample rate, a state
    """
    from .bundle import pack as api_pack
    from .report import human_bytes, table, to_json

    manifest = api_pack(model, output, labels=labels, preprocess=preprocess, ort_format=ort_format, name=name,
                        rtol=rtol, atol=atol, data=data)
    if as_json:
        click.echo(to_json(manifest))
        return
    import os

    click.echo(f"{output}: bundle '{manifest['name']}', {human_bytes(os.path.getsize(output))}, "
               f"preprocessing {manifest['preprocessing']['kind']}"
               + (f", {manifest['labels']['count']} labels" if manifest.get("labels") else ""))
    click.echo(table(["file", "bytes", "sha256"],
                     [[n, f"{f['bytes']:,}", f["sha256"][:16]] for n, f in sorted(manifest["files"].items())],
                     "lrl"))
    for w in manifest.get("warnings", []):
        click.echo(f"warning: {w}", err=True)


def _render(report: dict) -> str:
    from .report import table

    lines = [table(["file", "bytes", "status"],
                   [[f["file"], f"{f['bytes']:,}" if isinstance(f.get("bytes"), int) else "-", f["status"]]
                    for f in report["files"]], "lrl")]
    rows = []
    for m in report["models"]:
        outs = m.get("outputs") or []
        err = max((o.get("max_abs_err", 0.0) for o in outs), default=None)
        rows.append([m["file"], "-" if err is None else f"{err:.3g}", m["status"], m.get("problem", "")])
    lines.append(table(["model", "smoke max abs err", "status", "problem"], rows, "lrll"))
    return "\n\n".join(lines)


@click.command("verify-bundle", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the verification report as JSON (also on failure).")
def verify_bundle(bundle, as_json):
    """Verify an edge bundle: every sha256, then each model loaded in ONNX Runtime and run on the
    stored smoke inputs against the stored outputs. Exit 3 when anything fails.

    Unpacking refuses absolute paths, '..', links, device files and oversized entries.

    \b
    Examples:
      onnxopt verify-bundle digits.tar.gz
      onnxopt verify-bundle unpacked-bundle/ --json | jq .passed
    """
    from .bundle import verify_bundle as api_verify
    from .report import to_json

    try:
        report = api_verify(bundle)
    except VerificationFailed as e:
        report = getattr(e, "report", None)
        if report is not None:
            if as_json:
                click.echo(to_json(report))
            else:
                click.echo(_render(report), err=True)
        raise
    if as_json:
        click.echo(to_json(report))
        return
    click.echo(_render(report))
    click.echo(f"{bundle}: verified ({len(report['files'])} files, {len(report['models'])} model(s) match "
               "their smoke outputs)")
