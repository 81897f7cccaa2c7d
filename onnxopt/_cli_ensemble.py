"""``onnxopt ensemble``: parse, call :func:`onnxopt.ensemble.ensemble`, render. Registered in cli.py."""

from __future__ import annotations

import click

from ._cli_context import CONTEXT, external_data_option
from .errors import BadInput

__all__ = ["ensemble"]


def _input_map(items: tuple[str, ...]) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for item in items:
        try:
            idx, rest = item.split(":", 1)
            src, dst = rest.split("=", 1)
            k = int(idx)
        except ValueError:
            raise BadInput("--input-map", f"'{item}' is not INDEX:NAME=ENSEMBLE_NAME",
                           "e.g. --input-map 1:data=input (model 1's input 'data' is fed the ensemble's 'input')") from None
        if not src or not dst:
            raise BadInput("--input-map", f"'{item}' names no input")
        out.setdefault(k, {})[src] = dst
    return out


@click.command("ensemble", context_settings=CONTEXT)
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the fused .onnx file.")
@external_data_option
@click.option("--method", type=click.Choice(["parallel", "cascade", "soup"]), default="parallel", show_default=True,
              help="parallel: all models, outputs combined; cascade: SMALL BIG, the big one only when the small "
              "one is unsure; soup: one model with the averaged weights of same-architecture models.")
@click.option("--combine", type=click.Choice(["mean", "weighted", "softmax-mean", "vote"]), default="mean",
              show_default=True, help="parallel: how the first outputs are combined, weighted by --weights: mean of "
              "the raw outputs (logits stay logits), mean of softmax probabilities (for logits of different scales), "
              "or share of argmax votes.")
@click.option("--weights", help="parallel: one weight per model, comma-separated (normalised to sum to one), or "
              "'fit' (minimise log-loss on --validation) [default: uniform].")
@click.option("--data", help="Evaluation data: 'digits', .npz/.npy, an image folder or module:function "
              "[default: the first model's sidecar dataset].")
@click.option("--validation", help="Labelled data for --weights fit, --threshold auto and --soup greedy "
              "[default for digits: a seeded quarter of the train split; never the evaluation data].")
@click.option("--threshold", help="cascade: the small model answers a batch when every row's max softmax "
              "probability is at least this; 'auto' chooses it on --validation for --target-accuracy "
              "[default: auto].")
@click.option("--target-accuracy", type=float, help="cascade, --threshold auto: validation accuracy to keep, in "
              "[0, 1] [default: the big model's].")
@click.option("--soup", type=click.Choice(["uniform", "greedy"]), default="uniform", show_default=True,
              help="soup: average all models, or add them best-first while validation accuracy does not drop.")
@click.option("--input-map", "input_map", multiple=True, metavar="INDEX:NAME=ENSEMBLE_NAME",
              help="Feed model INDEX's (0 = first) input NAME from the ensemble input ENSEMBLE_NAME (repeatable).")
@click.option("--preprocess", type=click.Choice(["imagenet", "unit", "raw"]), default="imagenet", show_default=True,
              help="How an image folder becomes input.")
@click.option("--latency-seconds", type=float, default=1.0, show_default=True,
              help="cascade: seconds spent timing the mean latency per sample on the data (0: skip).")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar JSON.")
def ensemble(models, output, method, combine, weights, data, validation, threshold, target_accuracy, soup, input_map,
             preprocess, latency_seconds, as_json):
    """Fuse ONNX models into one graph: a parallel ensemble, a cascade, or a weight soup; verified.

    parallel: MODELS run side by side in one session on shared inputs (names prefixed, opsets
    reconciled); the output is their mean, weighted mean, mean of softmax probabilities or vote,
    checked against the separate models. cascade: SMALL BIG; the big model runs (inside an ONNX If)
    only when the small one's confidence is below the threshold for some row of the batch, so at
    batch 1 the decision is per sample. soup: same-architecture models averaged into one.

    \b
    Examples:
      onnxopt ensemble a.onnx b.onnx c.onnx -o ens.onnx --data digits
      onnxopt ensemble a.onnx b.onnx c.onnx -o ens.onnx --weights fit --data digits
      onnxopt ensemble a.onnx b.onnx -o ens.onnx --combine softmax-mean --weights 2,1
      onnxopt ensemble a.onnx b.onnx -o ens.onnx --input-map 1:data=input --data val.npz
      onnxopt ensemble small.onnx big.onnx -o cascade.onnx --method cascade --data digits
      onnxopt ensemble small.onnx big.onnx -o cascade.onnx --method cascade --threshold 0.9
      onnxopt ensemble ft1.onnx ft2.onnx ft3.onnx -o soup.onnx --method soup --soup greedy --data digits
    """
    from .ensemble import ensemble as api_ensemble
    from .render import ensemble_summary
    from .report import to_json

    side = api_ensemble(list(models), output, method=method, combine=combine, weights=weights, data=data,
                        validation=validation, threshold=threshold,
                        target_accuracy=target_accuracy, soup=soup, input_map=_input_map(input_map) or None,
                        preprocess=preprocess, latency_seconds=latency_seconds)
    if as_json:
        click.echo(to_json(side))
        return
    click.echo(ensemble_summary(side, output, method))
