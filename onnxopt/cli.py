"""The ``onnxopt`` command line: each command parses, calls the API, renders. No logic here."""

from __future__ import annotations

import logging
import sys

import click

from ._cli_context import CONTEXT, external_data_option
from .executor import EXECUTOR_HELP
from .errors import BadInput, InternalError, OnnxoptError
from .gates import Gates
from .jobs import DataOptions
from .options import click_options
from .passes import PruneChannels, PruneMasks, QuantizeInt4, QuantizeStatic, Simplify
from .prune import PruneSettings
from .quantize import INT4_OPTIONS, STATIC_OPTIONS, QuantizeSettings



class _Group(click.Group):
    """The one place errors become exit codes (see :mod:`onnxopt.errors`): a user's error
    (``BadInput``, exit 2) or a failed verification or gate (exit 3) prints
    ``error: <where>: <problem>[; <hint>]`` on stderr, no traceback, and the error's ``report``
    (a verification table) when it has one. An :class:`InternalError` -- onnxopt's own output is
    wrong -- and any other exception are bugs: full traceback, exit 1."""

    def invoke(self, ctx):
        import shutil
        import tempfile

        from ._startup import INTERRUPTED_EXIT, restore_interrupts

        restore_interrupts()
        # One temp folder for the whole command, onnxopt's and the libraries' (ORT's quantizer,
        # onnx, numpy all use tempfile): removed on every exit path, a Ctrl-C or a crash included,
        # so a library that forgets a file leaves nothing behind either.
        scratch = tempfile.mkdtemp(prefix="onnxopt-run-")
        previous, tempfile.tempdir = tempfile.tempdir, scratch
        ctx.call_on_close(lambda: (setattr(tempfile, "tempdir", previous), shutil.rmtree(scratch, ignore_errors=True)))
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # every output is written to a temp file and renamed, temp folders are context managers:
            # an interrupt leaves nothing half-written
            click.echo("error: interrupted; nothing was left half-written", err=True)
            ctx.exit(INTERRUPTED_EXIT)
        except InternalError:
            raise  # click prints the traceback of an uncaught exception and exits 1
        except OnnxoptError as e:
            click.echo(f"error: {e.one_line()}", err=True)
            report = e.report
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
    from .render import models_table
    from .report import to_json
    from .sources import list_models

    items = list_models()
    click.echo(to_json(items) if as_json else models_table(items))


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
@external_data_option
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
    from .export import export as api_export
    from .export import Tolerance
    from .render import export_summary
    from .report import to_json

    sidecar = api_export(model, output, exporter=exporter, opset=opset, input_shape=input_shape, dtype=dtype,
                         weights=weights, task=task, dynamic=not static, tolerance=Tolerance(atol=atol, rtol=rtol))
    click.echo(to_json(sidecar) if as_json else export_summary(sidecar, output))


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
    from .bench import bench as api_bench
    from .artifact import write_text
    from .report import bench_markdown, bench_table, to_json

    report = api_bench(list(models), settings=_settings(batch, threads, providers, duration, warmup, seq_len,
                                                        no_memory), data=data, torch_ref=torch_ref)
    if markdown:
        write_text(markdown, bench_markdown(report))
    click.echo(to_json(report) if as_json else bench_table(report))


def _print_search(report: dict) -> None:
    from .render import search_summary

    click.echo(search_summary(report))


@main.command(context_settings=CONTEXT)
@click.argument("model", default="digits-cnn")
@click.option("-o", "--out", type=click.Path(), help="Output folder [default: out/<model>].")
@external_data_option
@_apply(_source_options)
@_apply(_bench_options(batch="1,8", duration=2.0))
@click_options(Gates)
@click.option("--search/--no-search", default=None,
              help="Run the auto search [default: when a gate is given].")
@click.option("--budget", type=float, help="Time budget for the search in seconds.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="What the search optimizes for.")
@click.option("--no-torch", is_flag=True, help="Do not time PyTorch eager as an extra row.")
@click.option("--executor", default="local", show_default=True, help=EXECUTOR_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def optimize(model, out, input_shape, dtype, weights, task, exporter, opset, batch, threads, providers, duration,
             warmup, seq_len, no_memory, data, search, budget, target, no_torch, executor, as_json, **gates):
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
    from .optimize import optimize as api_optimize
    from .render import optimize_summary
    from .report import to_json

    report = api_optimize(model, out, exporter=exporter, opset=opset, input_shape=input_shape, dtype=dtype,
                          weights=weights, task=task, data=data, torch_eager=not no_torch,
                          settings=_settings(batch, threads, providers, duration, warmup, seq_len, no_memory),
                          search=search, gates=Gates.from_options(gates), budget_s=budget, target=target,
                          executor=executor)
    click.echo(to_json(report) if as_json else optimize_summary(report))

@main.command("run", context_settings=CONTEXT)
@click.argument("recipes", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", type=click.Path(), help="Output folder [default: the recipe's out, or out/<recipe>; "
              "for several recipes out/fleet, one folder per recipe inside].")
@external_data_option
@click.option("--executor", default="local", show_default=True,
              help="Where the recipes run: local (one after another) or ray[:ADDRESS] (one Ray task per recipe).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def run_cmd(recipes, out, executor, as_json):
    """Run a declarative recipe (YAML or JSON): a model, data, steps or a search, and gates.

    Several recipes (or --executor ray) make a fleet: every recipe is validated first, each runs
    into OUT/<recipe name>, and OUT/fleet.json and fleet.md index the results; exit 3 when any
    recipe fails a gate.

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
      onnxopt run recipes/*.yaml --executor ray -o out/release
    """
    from .recipe import fleet_markdown, run_fleet, run_recipe
    from .report import to_json

    if len(recipes) > 1 or executor != "local":
        try:
            fleet = run_fleet(list(recipes), out, executor=executor)
        except OnnxoptError as e:
            if isinstance(e.report, dict) and e.report.get("kind") == "fleet" and not as_json:
                click.echo(fleet_markdown(e.report))
            raise
        click.echo(to_json(fleet) if as_json else fleet_markdown(fleet))
        return
    recipe = recipes[0]
    try:
        report = run_recipe(recipe, out)
    except OnnxoptError as e:
        if e.report is not None and not as_json:
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
    from .report import rerender

    _print_search(rerender(run_dir))

def _output_option(what: str):
    def deco(f):
        f = external_data_option(f)
        return click.option("-o", "--output", required=True, type=click.Path(),
                            help=f"Where to write the {what} .onnx file.")(f)
    return deco


_json_option = click.option("--json", "as_json", is_flag=True, help="Print the sidecar JSON.")


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path())
@_output_option("quantized")
@click_options(QuantizeSettings, ["mode"])
@click_options(DataOptions)
@click_options(QuantizeSettings, ["target"])
@click_options(QuantizeStatic, list(STATIC_OPTIONS))
@click_options(QuantizeInt4, list(INT4_OPTIONS))
@click_options(Gates, ["max_drop", "min_agreement", "min_cosine", "max_channel_error", "max_decision_change", "max_size_mb"])
@click_options(QuantizeSettings, ["fallback", "max_float_nodes", "speed_check"])
@_json_option
def quantize(model, output, as_json, **options):
    """Quantize an ONNX model with expert defaults (INT8 static/dynamic, FP16), verified.

    With no options: CNNs get static INT8 as QDQ, uint8 activations and int8 per-channel weights
    after quant_pre_process; transformers get ORT's transformer fusions and dynamic per-channel
    INT8; --target cuda gets FP16 with float32 IO. --mode int4 stores MatMul weights (and with
    --int4-embedding the embedding table) in 4-bit blocks, for size. Exit 3 when a gate fails (the
    model and its sidecar are written under a .rejected name, so you can look).

    \b
    Examples:
      onnxopt quantize digits.onnx -o digits-int8.onnx --data digits --max-drop 0.5
      onnxopt quantize minilm.onnx -o minilm-int8.onnx
      onnxopt quantize resnet18.onnx -o r18-int8.onnx --data calib.npz --method entropy
      onnxopt quantize resnet18.onnx -o r18-int8.onnx --data val_images/ --max-drop 1%rel
      onnxopt quantize minilm.onnx -o minilm-int4.onnx --mode int4 --int4-embedding --min-cosine 0.95
    """
    from .quantize import quantize as api_quantize
    from .render import quantize_summary
    from .report import to_json

    side = api_quantize(model, output, **_given(options))
    click.echo(to_json(side) if as_json else quantize_summary(side, output))


def _given(options: dict) -> dict:
    """The options click passed, without the unset ones (None) so the API's defaults apply."""
    return {k: v for k, v in options.items() if v is not None}


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path())
@_output_option("simplified")
@click_options(Simplify)
@click_options(DataOptions)
@click_options(Gates, ["min_agreement", "min_cosine", "max_channel_error", "max_decision_change"])
@_json_option
def simplify(model, output, as_json, **settings):
    """Simplify an ONNX graph: constant folding, ORT offline fusions, transformer fusions; verified.

    \b
    Examples:
      onnxopt simplify resnet18.onnx -o resnet18-simple.onnx
      onnxopt simplify minilm.onnx -o minilm-fused.onnx --transformer bert
      onnxopt simplify det.onnx -o det-simple.onnx --data recorded.npz
    """
    from .apply import simplify as api_simplify
    from .render import simplify_summary
    from .report import to_json

    side = api_simplify(model, output, **_given(settings))
    click.echo(to_json(side) if as_json else simplify_summary(side, output))


@main.command(context_settings=CONTEXT)
@click.argument("model")
@_output_option("pruned")
@click_options(PruneSettings, ["method"])
@click_options(PruneChannels, ["amount", "importance"])
@click_options(PruneSettings, ["reconstruct", "speed_check"])
@click_options(PruneChannels, ["round_to", "skip"])
@click_options(PruneMasks, ["threshold", "scope"])
@click.option("--nm", "nm", default="2:4", show_default=True, help="nm: keep N of every M weights (N:M).")
@click_options(DataOptions)
@click_options(PruneChannels, ["calibration_samples"])
@click_options(Gates, ["max_drop", "min_agreement", "min_cosine", "max_channel_error", "max_decision_change", "max_size_mb"])
@click_options(PruneSettings, ["finetune_epochs", "weights", "input_shape"])
@_json_option
def prune(model, output, nm, as_json, **options):
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
    from .prune import prune as api_prune
    from .render import prune_summary
    from .report import to_json

    options = _given(options)
    if options.get("method") == "nm":
        try:
            options["n"], options["m"] = (int(v) for v in nm.split(":"))
        except ValueError:
            raise BadInput("--nm", f"'{nm}' is not N:M", "write it like 2:4") from None
    side = api_prune(model, output, **options)
    if as_json:
        click.echo(to_json(side))
        return
    text, warnings = prune_summary(side, output)
    for w in warnings:
        click.echo(w, err=True)
    click.echo(text)


class _PassGroup(click.Group):
    """``onnxopt apply PASS``: one subcommand per pass in the registry, made when it is asked for,
    with options generated from the pass's fields -- a pass added to the registry is on the CLI
    with no other change."""

    def list_commands(self, ctx):
        from .passes import PASSES

        return sorted(PASSES)

    def get_command(self, ctx, name):
        from .passes import PASSES

        cls = PASSES.get(name)
        if cls is None:
            return None
        doc = (cls.__doc__ or name).strip()

        @click.command(name, context_settings=CONTEXT, help=f"Run the {name} pass, verified.\n\n{doc}")
        @click.argument("model", type=click.Path())
        @_output_option(name)
        @click_options(cls)
        @click_options(DataOptions)
        @click_options(Gates, ["max_drop", "min_agreement", "min_cosine", "max_channel_error", "max_decision_change", "max_size_mb"])
        @_json_option
        def run_pass(model, output, as_json, **options):
            from .apply import apply
            from .render import apply_summary
            from .report import to_json

            side = apply(name, model, output, **_given(options))
            click.echo(to_json(side) if as_json else apply_summary(side, output))

        return run_pass


@main.group("apply", cls=_PassGroup, context_settings=CONTEXT)
def apply_cmd() -> None:
    """Run any registered pass on an ONNX file, verified against it and gated like every command.

    Each pass's options are its settings (the same names a recipe uses).

    \b
    Examples:
      onnxopt apply --help                              # the passes
      onnxopt apply prune-masks m.onnx -o sparse.onnx --method nm
      onnxopt apply prune-channels m.onnx -o half.onnx --data digits --amount 0.5 --max-drop 1
    """


from ._cli_bundle import pack as _pack_cmd, verify_bundle as _verify_bundle_cmd  # noqa: E402
from ._cli_ensemble import ensemble as _ensemble_cmd  # noqa: E402
from ._cli_inspect import inspect as _inspect_cmd  # noqa: E402
from ._cli_train import distill as _distill_cmd, head as _head_cmd  # noqa: E402

main.add_command(_head_cmd)
main.add_command(_distill_cmd)
main.add_command(_ensemble_cmd)
main.add_command(_pack_cmd)
main.add_command(_verify_bundle_cmd)
main.add_command(_inspect_cmd)

if __name__ == "__main__":  # pragma: no cover
    main()
