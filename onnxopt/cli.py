"""The ``onnxopt`` command line: each command parses, calls the API, renders. No logic here."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .errors import BadInput, OnnxoptError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """One abort path for user errors: ``<where>: <problem>[; <hint>]`` on stderr, exit 2 or 3,
    no traceback. Anything else is a bug and keeps its traceback (exit 1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OnnxoptError as e:
            click.echo(f"error: {e.one_line()}", err=True)
            report = getattr(e, "report", None)
            if report is not None and ctx.meta.get("onnxopt.verbose_errors", True):
                from .report import verification_table

                if isinstance(report, dict) and "cases" in report:
                    click.echo(verification_table(report), err=True)
            ctx.exit(e.exit_code)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _ints(text: str, option: str) -> tuple[int, ...]:
    from .errors import BadInput

    try:
        vals = tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise BadInput(option, f"'{text}' is not a comma-separated list of integers") from None
    if not vals:
        raise BadInput(option, "is empty")
    return vals


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="onnxopt", prog_name="onnxopt")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """Make PyTorch and ONNX models smaller and faster on ONNX Runtime, verified and measured.

    \b
    Examples:
      onnxopt models
      onnxopt optimize                       # digits-cnn: export, verify, benchmark
      onnxopt export resnet18 -o resnet18.onnx
      onnxopt bench a.onnx b.onnx --batch 1,8 --json
    """
    _setup_logging(verbose)


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the built-in models and what each is for.

    \b
    Example:
      onnxopt models --json
    """
    from .report import table, to_json
    from .sources import list_models

    items = list_models()
    if as_json:
        click.echo(to_json(items))
        return
    click.echo(table(["name", "task", "inputs", "dataset", "what it is for"],
                     [[m["name"], m["task"], m["inputs"], m["dataset"] or "-", m["summary"]] for m in items],
                     "lllll"))


_source_options = [
    click.option("--input-shape", help="Input shape for a factory model, e.g. 1x3x224x224."),
    click.option("--dtype", default="float32", show_default=True, help="Input dtype for a factory model."),
    click.option("--weights", type=click.Path(), help="state_dict for a factory model (torch.load weights_only)."),
    click.option("--task", type=click.Choice(["classification", "embedding", "other"]),
                 help="Task of a factory model (classification adds top-1 agreement checks)."),
    click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
                 show_default=True, help="torch exporter; auto takes the one measured faster for the model."),
    click.option("--opset", type=int, help="ONNX opset (default: the model's measured default, 17-18)."),
]


def _apply(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the .onnx file.")
@_apply(_source_options)
@click.option("--static", is_flag=True, help="Fixed input shapes (no dynamic batch/sequence axes).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Verification absolute tolerance.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Verification tolerance relative to max|ref|.")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar JSON instead of a table.")
def export(model, output, input_shape, dtype, weights, task, exporter, opset, static, atol, rtol, as_json):
    """Export a torch model to ONNX and verify it against PyTorch.

    MODEL is a built-in name (see `onnxopt models`) or a factory `package.module:function`
    returning an nn.Module. The file is verified at batch 1 and 8 (and two sequence lengths for
    text) on random and real inputs; a mismatch exits 3 and writes nothing.

    \b
    Examples:
      onnxopt export digits-cnn -o digits.onnx
      onnxopt export minilm -o minilm.onnx --exporter torchscript
      onnxopt export mypkg.nets:make_net --input-shape 1x3x32x32 --weights net.pt -o net.onnx
    """
    from . import export as api_export
    from .export import Tolerance
    from .report import to_json, verification_table

    sidecar = api_export(model, output, exporter=exporter, opset=opset, input_shape=input_shape, dtype=dtype,
                         weights=weights, task=task, dynamic=not static, tolerance=Tolerance(atol=atol, rtol=rtol))
    if as_json:
        click.echo(to_json(sidecar))
        return
    step = sidecar["steps"][0]
    click.echo(f"{output}: exported with {step['exporter']} ({step['exporter_choice']}), opset {step['opset']}, "
               f"{sidecar['bytes']:,} bytes, sha256 {sidecar['sha256'][:12]}")
    click.echo(verification_table(sidecar["verification"]))


def _bench_options(batch: str = "1", duration: float = 3.0) -> list:
    return [
        click.option("--batch", "batch", default=batch, show_default=True, help="Batch sizes, comma-separated."),
        click.option("--threads", default=None, help="Intra-op thread counts, comma-separated [default: all cores]."),
        click.option("--provider", "providers", type=click.Choice(["auto", "cpu", "cuda"]), multiple=True,
                     help="Execution providers [default: auto = CPU, and CUDA when present]."),
        click.option("--duration", type=float, default=duration, show_default=True,
                     help="Seconds of timed work per configuration, shared by all models."),
        click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs per model first."),
        click.option("--seq-len", type=int, default=128, show_default=True, help="Sequence length for text inputs."),
        click.option("--no-memory", is_flag=True, help="Skip the peak-memory measurement (one process per model)."),
        click.option("--data", help="Data for accuracy and agreement: 'digits', 'sentences' (built-in text) or an .npz "
                     "(inputs by name + labels)."),
    ]


def _settings(batch, threads, providers, duration, warmup, seq_len, no_memory):
    from .bench import BenchSettings

    return BenchSettings(batches=_ints(batch, "--batch"), threads=_ints(threads, "--threads") if threads else (),
                         providers=tuple(providers) or ("auto",), duration=duration, warmup=warmup,
                         seq=seq_len, memory=not no_memory)


@main.command(context_settings=CONTEXT)
@click.argument("models", nargs=-1, required=True)
@_apply(_bench_options())
@click.option("--torch", "torch_ref", help="Also time this torch model (built-in or factory) in PyTorch eager.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--markdown", type=click.Path(), help="Also write the report as a markdown file.")
def bench(models, batch, threads, providers, duration, warmup, seq_len, no_memory, data, torch_ref, as_json,
          markdown):
    """Benchmark ONNX models side by side; the first is the reference.

    Models are timed interleaved in one run (warm-up, round-robin blocks, spinning off), so the
    speed-up column is a ratio measured under the same machine noise.

    \b
    Examples:
      onnxopt bench fp32.onnx int8.onnx
      onnxopt bench digits.onnx --data digits --torch digits-cnn --batch 1,8 --threads 1,2
      onnxopt bench a.onnx b.onnx --json | jq '.rows[] | {model, p50_ms, speedup}'
    """
    from . import bench as api_bench
    from .artifact import write_text
    from .report import bench_markdown, bench_table, to_json

    report = api_bench(list(models), settings=_settings(batch, threads, providers, duration, warmup, seq_len,
                                                        no_memory), data=data, torch_ref=torch_ref)
    if markdown:
        write_text(markdown, bench_markdown(report))
    click.echo(to_json(report) if as_json else bench_table(report))


def _gate_options() -> list:
    return [
        click.option("--max-drop", help="Gate: accuracy drop on labelled data, points (0.5, 1%) or relative (2%rel)."),
        click.option("--min-agreement", type=float, help="Gate without labels: top-1 agreement (classifiers) or "
                     "min cosine with the reference, e.g. 0.99."),
        click.option("--min-cosine", type=float, help="Gate without labels: mean cosine similarity of the outputs "
                     "with the reference's, e.g. 0.99."),
        click.option("--min-speedup", type=float, help="Gate: speed-up vs the reference at the first batch size."),
        click.option("--max-size-mb", type=float, help="Gate: size on disk in MB."),
        click.option("--max-p90-ms", type=float, help="Gate: p90 latency at the first batch size."),
    ]


def _print_search(report: dict) -> None:
    from .report import search_table

    click.echo(search_table(report))
    if report.get("best"):
        click.echo(f"\nbest: {report['best']}")
    out = report.get("out") or str(Path(report["best"]).parent if report.get("best") else ".")
    click.echo(f"report: {out}/report.html, {out}/report.md, {out}/report.json")


@main.command(context_settings=CONTEXT)
@click.argument("model", default="digits-cnn")
@click.option("-o", "--out", type=click.Path(), help="Output folder [default: out/<model>].")
@_apply(_source_options)
@_apply(_bench_options(batch="1,8", duration=2.0))
@_apply(_gate_options())
@click.option("--search/--no-search", default=None,
              help="Run the auto search [default: when a gate is given].")
@click.option("--budget", type=float, help="Time budget for the search in seconds.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="What the search optimizes for.")
@click.option("--no-torch", is_flag=True, help="Do not time PyTorch eager as an extra row.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def optimize(model, out, input_shape, dtype, weights, task, exporter, opset, batch, threads, providers, duration,
             warmup, seq_len, no_memory, data, max_drop, min_agreement, min_cosine, min_speedup, max_size_mb, max_p90_ms,
             search,
             budget, target, no_torch, as_json):
    """The main job: export, verify and benchmark MODEL (default: digits-cnn), or search.

    MODEL is a built-in name, a factory `module:function` or a .onnx file. Writes the verified
    model, its sidecar, report.json and report.md to the output folder. With a gate (--max-drop,
    --min-agreement, ...) it searches: simplification, INT8 (QDQ/QOperator), channel pruning with
    reconstruction and their combinations -- and, for a torch source with the built-in digits
    data, pruning + fine-tuning -- are built, gated on the data (cheap checks first), timed side
    by side, and the fastest variant that holds every gate is written as best.onnx, with the
    Pareto front and a latency-vs-accuracy plot in report.html. Exit 3 when no variant passes.

    \b
    Examples:
      onnxopt optimize
      onnxopt optimize digits-cnn --max-drop 0.5 --batch 450
      onnxopt optimize resnet18.onnx --data calib.npz --min-agreement 0.99 --budget 120
      onnxopt optimize resnet18 --batch 1,8 --threads 1,2
    """
    from . import optimize as api_optimize
    from .report import bench_table, to_json, verification_table

    report = api_optimize(model, out, exporter=exporter, opset=opset, input_shape=input_shape, dtype=dtype,
                          weights=weights, task=task, data=data, torch_eager=not no_torch,
                          settings=_settings(batch, threads, providers, duration, warmup, seq_len, no_memory),
                          search=search, max_drop=max_drop, min_agreement=min_agreement, min_cosine=min_cosine,
                          min_speedup=min_speedup,
                          max_size_mb=max_size_mb, max_p90_ms=max_p90_ms, budget_s=budget, target=target)
    if as_json:
        click.echo(to_json(report))
        return
    art = report["artifact"]
    click.echo(f"model: {report['out']}/{art['model']}  ({art['bytes']:,} bytes, sha256 {art['sha256'][:12]})")
    if art.get("verification") and "tolerance" in art["verification"]:
        click.echo(verification_table(art["verification"]))
    click.echo("")
    if report.get("kind") == "search":
        _print_search(report)
        return
    click.echo(bench_table(report["bench"]))
    click.echo(f"\nreport: {report['out']}/report.md, {report['out']}/report.json")


@main.command("run", context_settings=CONTEXT)
@click.argument("recipe", type=click.Path())
@click.option("-o", "--out", type=click.Path(), help="Output folder [default: the recipe's out, or out/<recipe>].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def run_cmd(recipe, out, as_json):
    """Run a declarative recipe (YAML or JSON): a model, data, steps or a search, and gates.

    The recipe is validated before any work starts (unknown keys and passes are errors that name
    the line and suggest the nearest name). Finished steps are cached by content hash, so a re-run
    reuses them and gives the same bytes. Exit codes: 0 every gate holds, 3 a gate failed (the
    report says which and by how much), 2 bad input.

    \b
    Example recipe (digits.yaml):
      model: digits-cnn
      data: digits
      target: {batch: [450], threads: 2}
      steps:
        - pass: prune-channels
          amount: 0.25
        - quant-preprocess
        - pass: quantize-static
      gates: {max_drop: 0.5, min_speedup: 1.5}
    \b
    Examples:
      onnxopt run digits.yaml
      onnxopt run search.yaml --json | jq .chosen
    """
    from .recipe import run_recipe
    from .report import to_json

    try:
        report = run_recipe(recipe, out)
    except OnnxoptError as e:
        if getattr(e, "report", None) is not None and not as_json:
            _print_search(e.report)
        raise
    if as_json:
        click.echo(to_json(report))
        return
    _print_search(report)


@main.command("report", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
def report_cmd(run_dir):
    """Re-render report.md and report.html (with the latency-vs-accuracy plot) from a run's
    report.json, and print the table.

    \b
    Example:
      onnxopt report out/digits-cnn
    """
    import json as _json

    from .recipe import write_reports

    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise BadInput(str(run_dir), "has no report.json", "point at a folder written by optimize --max-drop or run")
    try:
        report = _json.loads(path.read_text())
    except ValueError:
        raise BadInput(str(path), "is not valid JSON") from None
    if report.get("kind") != "search":
        raise BadInput(str(path), "is not a search or recipe report", "run optimize with a gate, or onnxopt run")
    write_reports(report, Path(run_dir))
    _print_search(report)


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the quantized .onnx file.")
@click.option("--mode", type=click.Choice(["auto", "static", "dynamic", "fp16"]), default="auto", show_default=True,
              help="auto picks by model family and target and says why.")
@click.option("--data", help="Calibration/evaluation data: 'digits', 'sentences' (built-in text), an .npz/.npy, a "
              "folder of images (class subfolders give labels) or module:function [default: the model's sidecar "
              "dataset].")
@click.option("--preprocess", type=click.Choice(["imagenet", "unit", "raw"]), default="imagenet", show_default=True,
              help="How an image folder becomes input: imagenet = resize/centre-crop, /255, ImageNet mean/std.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="Static calibration method.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel.")
@click.option("--format", "fmt", type=click.Choice(["qdq", "qoperator"]), default="qdq", show_default=True)
@click.option("--activation-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True)
@click.option("--weight-type", type=click.Choice(["uint8", "int8"]), default="int8", show_default=True)
@click.option("--calibration-samples", type=int, default=128, show_default=True)
@click.option("--exclude", "exclude", multiple=True, help="Node name to leave in float (repeatable).")
@click.option("--max-drop", help="Accuracy gate on labelled data: points (0.5, 0.5pt, 1%) or relative "
              "(2%rel); exit 3 when it fails.")
@click.option("--fallback/--no-fallback", default=True, show_default=True,
              help="When the gate fails, leave the most sensitive nodes in float until it holds.")
@click.option("--max-float-nodes", type=int, help="Cap on nodes the fallback leaves in float "
              "[default: a quarter of the quantized nodes, at least 8].")
@click.option("--speed-check/--no-speed-check", default=None,
              help="Time the result against the input and refuse it when slower [default: after a fallback].")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar JSON.")
def quantize(model, output, mode, data, preprocess, target, method, per_channel, fmt, activation_type, weight_type,
             calibration_samples, exclude, max_drop, fallback, max_float_nodes, speed_check, as_json):
    """Quantize an ONNX model with expert defaults (INT8 static/dynamic, FP16), verified.

    With no options: CNNs get static INT8 as QDQ, uint8 activations and int8 per-channel weights
    after quant_pre_process; transformers get ORT's transformer fusions and dynamic per-channel
    INT8; --target cuda gets FP16 with float32 IO.

    \b
    Examples:
      onnxopt quantize digits.onnx -o digits-int8.onnx --data digits --max-drop 0.5
      onnxopt quantize minilm.onnx -o minilm-int8.onnx
      onnxopt quantize resnet18.onnx -o r18-int8.onnx --data calib.npz --method entropy
      onnxopt quantize resnet18.onnx -o r18-int8.onnx --data val_images/ --max-drop 1%rel
    """
    from . import quantize as api_quantize
    from .report import table, to_json

    side = api_quantize(model, output, mode=mode, data=data, target=target, method=method, per_channel=per_channel,
                        format=fmt, activation_type=activation_type, weight_type=weight_type,
                        calibration_samples=calibration_samples, nodes_to_exclude=tuple(exclude), max_drop=max_drop,
                        fallback=fallback, max_float_nodes=max_float_nodes, speed_check=speed_check,
                        preprocess=preprocess)
    if as_json:
        click.echo(to_json(side))
        return
    q = side["quantize"]
    click.echo(f"{output}: {q['chosen']} ({'auto: ' + q['why'] if q['mode'] == 'auto' else 'requested'}), "
               f"{side['bytes']:,} bytes")
    ver = side["verification"]
    rows = [[c["case"], f"{c.get('max_abs_err', float('nan')):.3g}", f"{c.get('cosine_min', float('nan')):.4f}",
             f"{c['top1_agreement']:.3f}" if "top1_agreement" in c else "-"] for c in ver.get("cases", [])]
    click.echo(table(["vs input model", "max abs err", "cosine", "top-1"], rows, "lrrr"))
    if ver.get("accuracy"):
        a = ver["accuracy"]
        click.echo(f"accuracy on {a['dataset']} ({a['samples']}): {a['reference']:.4f} -> {a['quantized']:.4f} "
                   f"(drop {a['drop_points']:.2f} points)")
    fb = side.get("fallback")
    if fb:
        click.echo(f"fallback: first try dropped {fb['first_try']['drop_points']:.2f} points; "
                   f"{len(fb['kept_float'])} node(s) kept in float: {', '.join(fb['kept_float']) or '-'}")
    if side.get("speed_check"):
        sc = side["speed_check"]
        click.echo(f"speed check (batch 1, side by side): {sc['speedup']:.2f}x vs the input")


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the simplified .onnx file.")
@click.option("--level", type=click.Choice(["basic", "extended"]), default="basic", show_default=True,
              help="ORT offline optimization level (never 'all': its layouts are hardware-specific).")
@click.option("--transformer", type=click.Choice(["auto", "bert", "none"]), default="auto", show_default=True,
              help="onnxruntime.transformers fusions (Attention, SkipLayerNorm, BiasGelu).")
@click.option("--num-heads", type=int, default=0, help="Attention heads [default: detected from the graph].")
@click.option("--hidden-size", type=int, default=0, help="Hidden size [default: detected from the graph].")
@click.option("--gelu-approximation", is_flag=True, help="Fuse Gelu as FastGelu (tanh approximation; faster, "
              "max abs error ~5e-4).")
@click.option("--skip-layer-norm/--no-skip-layer-norm", default=True, show_default=True,
              help="Fuse residual Add + LayerNorm into SkipLayerNormalization (best on CUDA; ORT's CPU kernel "
              "is slower than the two ops, so --no-skip-layer-norm keeps them apart in a file for CPUs).")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar JSON.")
def simplify(model, output, level, transformer, num_heads, hidden_size, gelu_approximation, skip_layer_norm,
             as_json):
    """Simplify an ONNX graph: constant folding, ORT offline fusions, transformer fusions; verified.

    \b
    Examples:
      onnxopt simplify resnet18.onnx -o resnet18-simple.onnx
      onnxopt simplify minilm.onnx -o minilm-fused.onnx --transformer bert
    """
    from . import simplify as api_simplify
    from .report import to_json

    side = api_simplify(model, output, level=level, transformer=transformer, num_heads=num_heads,
                        hidden_size=hidden_size, gelu_approximation=gelu_approximation,
                        skip_layer_norm=skip_layer_norm)
    if as_json:
        click.echo(to_json(side))
        return
    st = side["steps"][-1]["stats"]
    fus = ", ".join(f"{k} {v}" for k, v in sorted((st.get("fusions") or {}).items()) if v) or "none"
    if st.get("residual_add_as_sum"):
        fus += f"; {st['residual_add_as_sum']} residual Add kept apart from LayerNorm (as Sum)"
    click.echo(f"{output}: nodes {st.get('nodes_before')} -> {st.get('nodes_after')}; fusions: {fus}")


@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the pruned .onnx file.")
@click.option("--method", type=click.Choice(["channel", "magnitude", "nm"]), default="channel", show_default=True,
              help="channel: remove whole channels (smaller and faster); magnitude / nm: zero weights "
              "(smaller under gzip only).")
@click.option("--amount", type=float, default=0.5, show_default=True,
              help="Fraction removed: channels per coupled group (channel) or weights (magnitude).")
@click.option("--importance", type=click.Choice(["auto", "l1", "l2", "activation"]), default="auto",
              show_default=True, help="Channel score; auto = activation-aware with data, else L2.")
@click.option("--reconstruct/--no-reconstruct", default=None,
              help="Re-fit the layers after pruned channels by least squares on the data [default: with data].")
@click.option("--round-to", type=int, default=1, show_default=True, help="Kept channel counts rounded to a multiple.")
@click.option("--skip", multiple=True, help="fnmatch pattern of node names left alone (repeatable).")
@click.option("--threshold", type=float, help="magnitude: zero |w| below this instead of --amount.")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True,
              help="magnitude: one threshold per layer or one for all layers.")
@click.option("--nm", "nm", default="2:4", show_default=True, help="nm: keep N of every M weights (N:M).")
@click.option("--data", help="Calibration/evaluation data: 'digits', 'sentences', .npz/.npy, an image folder or "
              "module:function [default: the model's sidecar dataset].")
@click.option("--preprocess", type=click.Choice(["imagenet", "unit", "raw"]), default="imagenet", show_default=True,
              help="How an image folder becomes input.")
@click.option("--calibration-samples", type=int, default=256, show_default=True)
@click.option("--max-drop", help="Accuracy gate: points (0.5, 1%) or relative (2%rel); exit 3 when it fails.")
@click.option("--finetune-epochs", type=int, help="Torch source only: prune with Torch-Pruning, fine-tune N epochs "
              "on --data, export and verify.")
@click.option("--weights", help="Torch factory source: a state_dict file.")
@click.option("--input-shape", help="Torch factory source: input shape, e.g. 1x3x224x224.")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar JSON.")
def prune(model, output, method, amount, importance, reconstruct, round_to, skip, threshold, scope, nm, data,
          preprocess, calibration_samples, max_drop, finetune_epochs, weights, input_shape, as_json):
    """Prune a model: structured channel pruning that really shrinks tensors, or weight masks.

    An .onnx file is pruned on the graph itself (no torch, no training): channels are removed
    across coupled layers and, with --data, the layers after them are re-fitted by least squares
    so accuracy holds. A built-in model or module:function with --finetune-epochs is pruned in
    torch (Torch-Pruning), fine-tuned, exported and verified.

    \b
    Examples:
      onnxopt prune digits.onnx -o digits-pruned.onnx --data digits --amount 0.5 --max-drop 1
      onnxopt prune resnet18.onnx -o r18-half.onnx --data calib.npz --round-to 8
      onnxopt prune resnet18.onnx -o r18-sparse.onnx --method nm --nm 2:4
      onnxopt prune digits-cnn -o digits-ft.onnx --finetune-epochs 2 --data digits
    """
    from . import prune as api_prune
    from .report import table, to_json

    try:
        n, m = (int(v) for v in nm.split(":"))
    except ValueError:
        raise BadInput("--nm", f"'{nm}' is not N:M", "write it like 2:4") from None
    side = api_prune(model, output, method=method, amount=amount, importance=importance, reconstruct=reconstruct,
                     round_to=round_to, skip=tuple(skip), threshold=threshold, scope=scope, n=n, m=m, data=data,
                     preprocess=preprocess, calibration_samples=calibration_samples, max_drop=max_drop,
                     finetune_epochs=finetune_epochs, weights=weights, input_shape=input_shape)
    if as_json:
        click.echo(to_json(side))
        return
    summ = side.get("prune")
    if summ is None:  # the torch route: prune + fine-tune + export
        st = side["steps"][0]
        click.echo(f"{output}: {st['library']}, {st['amount']:.0%} channels, {st['epochs']} epoch(s) on "
                   f"{st['training_data']}; params {st['params_before']:,} -> {st['params_after']:,} "
                   f"({st['params_ratio']:.3f}x); export verified against the pruned network")
        return
    click.echo(f"{output}: {summ['method']}; params {summ['params_before']:,} -> {summ['params_after']:,} "
               f"({summ['params_ratio']:.3f}x); bytes {summ['bytes_before']:,} -> {summ['bytes_after']:,}; "
               f"gzip {summ['gzip_bytes_before']:,} -> {summ['gzip_bytes_after']:,} ({summ['gzip_ratio']:.2f}x)")
    if summ["method"] != "channel":
        click.echo(f"sparsity {summ['sparsity']:.3f} of the pruned layers. Zeros do not make ONNX Runtime on CPU "
                   "faster: the gain is the compressed size above.")
    stats = side["steps"][-1]["passes"][0]["stats"]
    layers = stats.get("layers") or []
    if layers:
        def cell(key, v):
            if isinstance(v, float):
                return f"{v:.3f}"
            if isinstance(v, list) and key == "shape":
                return "x".join(map(str, v))
            if isinstance(v, list) and len(v) == 2 and key != "nodes":
                return f"{v[0]:,} -> {v[1]:,}"
            return ", ".join(map(str, v)) if isinstance(v, list) else str(v)

        keys = [k for k in ("node", "weight", "op", "shape", "in_channels", "out_channels", "params", "zeros",
                            "sparsity") if k in layers[0]]
        click.echo(table(keys, [[cell(k, row.get(k)) for k in keys] for row in layers[:25]]))
        if len(layers) > 25:
            click.echo(f"... {len(layers) - 25} more layers in --json")
    for sk in stats.get("skipped", [])[:10]:
        click.echo(f"left alone: {sk.get('node') or sk.get('weight') or sk}: {sk.get('reason', '')}")
    for w in summ.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    ver = side["verification"]
    if ver.get("accuracy"):
        a = ver["accuracy"]
        click.echo(f"accuracy on {a['dataset']} ({a['samples']}): {a['reference']:.4f} -> {a['pruned']:.4f} "
                   f"(drop {a['drop_points']:.2f} points)")


from ._cli_bundle import pack as _pack_cmd, verify_bundle as _verify_bundle_cmd  # noqa: E402
from ._cli_ensemble import ensemble as _ensemble_cmd  # noqa: E402
from ._cli_train import distill as _distill_cmd, head as _head_cmd  # noqa: E402

main.add_command(_head_cmd)
main.add_command(_distill_cmd)
main.add_command(_ensemble_cmd)
main.add_command(_pack_cmd)
main.add_command(_verify_bundle_cmd)

if __name__ == "__main__":  # pragma: no cover
    main()
