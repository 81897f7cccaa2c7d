"""``onnxopt head`` and ``onnxopt distill``: parse, call the API, render. No logic here.

Registered on the main group in :mod:`onnxopt.cli` (``main.add_command(head)``), whose one abort
path turns :class:`onnxopt.errors.OnnxoptError` into a one-line message and exit 2 or 3.
"""

from __future__ import annotations

import click

from ._cli_context import CONTEXT, external_data_option
from .distill import DistillSettings, distill as api_distill
from .head import HeadSettings, head as api_head
from .options import click_options

__all__ = ["head", "distill"]


def _command(name: str, argument: str, settings, what: str):
    """``onnxopt NAME ARGUMENT -o OUTPUT [the fields of settings] [--json]``: the command's
    options are the settings' fields (:func:`onnxopt.options.click_options`)."""
    decorators = [click.command(name, context_settings=CONTEXT), click.argument(argument),
                  click.option("-o", "--output", required=True, type=click.Path(),
                               help=f"Where to write the {what} .onnx file."),
                  external_data_option, click_options(settings),
                  click.option("--json", "as_json", is_flag=True, help="Print the sidecar JSON.")]

    def deco(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn
    return deco


@_command("head", "model", HeadSettings, "new")
def head(model, output, as_json, **options):
    """Replace a model's classifier head with one trained on a few labelled examples.

    MODEL is an .onnx file (the backbone stays frozen: features are extracted with ONNX Runtime
    and cached, a head is trained on them and grafted in place of the old one, and the result is
    checked against features -> head computed separately), or a built-in model / factory
    module:function, which --finetune-last N trains together with its last N blocks.

    \b
    Examples:
      onnxopt head backbone.onnx -o new.onnx --data train.npz --test-data test.npz
      onnxopt head digits04.onnx -o digits59.onnx --data digits --classes 5-9 --per-class 20 --test-data digits
      onnxopt head models.train_digits04:digits04_cnn --input-shape 1x1x8x8 -o d59-ft.onnx \\
          --data digits --classes 5-9 --per-class 20 --finetune-last 1 --test-data digits
      onnxopt head minilm.onnx -o topics.onnx --cut sentence_embedding --data sentences.npz --head mlp
    """
    from .render import head_summary
    from .report import to_json

    # The options are HeadSettings fields by name; the API builds the settings (and checks them).
    side = api_head(model, output, **options)
    if as_json:
        click.echo(to_json(side))
        return
    click.echo(head_summary(side, output))


@_command("distill", "teacher", DistillSettings, "student")
def distill(teacher, output, as_json, **options):
    """Distill a teacher into a smaller student; export and verify the student.

    TEACHER is an .onnx file (soft targets from ONNX Runtime, cached) or a built-in model /
    factory module:function run in torch. The loss is temperature-scaled KL on the logits plus
    cross-entropy on the labels weighted by --alpha. A checkpoint is written after every epoch;
    run the same command again after an interrupt and it resumes.

    \b
    Examples:
      onnxopt distill digits.onnx -o student.onnx
      onnxopt distill digits.onnx -o student.onnx --width 0.25 --epochs 30 --alpha 0.3
      onnxopt distill digits.onnx -o student.onnx --nproc 2
      onnxopt distill digits.onnx -o s.onnx --nnodes 2 --node-rank 0 --master 10.0.0.1:29500   # and rank 1
      onnxopt distill teacher.onnx -o s.onnx --student mypkg.nets:small --data train.npz --unlabelled extra.npz
    """
    from .render import distill_summary
    from .report import to_json

    # The options are DistillSettings fields by name; the API builds the settings (and checks them).
    side = api_distill(teacher, output, **options)
    if side.get("output", output) is None:  # a node other than 0 of a multi-machine run
        click.echo(to_json(side) if as_json else side["note"])
        return
    if as_json:
        click.echo(to_json(side))
        return
    click.echo(distill_summary(side, output))
