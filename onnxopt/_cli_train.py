"""``onnxopt head`` and ``onnxopt distill``: parse, call the API, render. No logic here.

Registered on the main group in :mod:`onnxopt.cli` (``main.add_command(head)``), whose one abort
path turns :class:`onnxopt.errors.OnnxoptError` into a one-line message and exit 2 or 3.
"""

from __future__ import annotations

import click

__all__ = ["head", "distill"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _pct(v) -> str:
    return "-" if v is None else f"{v:.4f}"


@click.command("head", context_settings=CONTEXT)
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the new .onnx file.")
@click.option("--data", required=True, help="Labelled training examples: an .npz (inputs by name + labels), "
              "'digits' (its train split), an image folder or module:function.")
@click.option("--test-data", help="Held-out labelled data for test accuracy and the graft check "
              "('digits' = its test split); samples of other classes are dropped.")
@click.option("--cut", default="auto", show_default=True,
              help="Where the backbone ends: auto = the classifier input and earlier block ends compared by "
              "cross-validated accuracy; head = the classifier input; or a tensor name.")
@click.option("--head", "kind", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True,
              help="linear = softmax regression; mlp = one hidden ReLU layer.")
@click.option("--hidden", type=int, default=128, show_default=True, help="Hidden units of the mlp head.")
@click.option("--classes", help="Keep only these labels, e.g. 5-9 or 1,3,5.")
@click.option("--per-class", type=int, help="Use this many examples per class (drawn with --seed): few-shot.")
@click.option("--class-names", help="Comma-separated names of the sorted label values [default: the values].")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Validation share: 1/this folds for early stopping and choosing the cut (0: none).")
@click.option("--no-refit", is_flag=True, help="Keep the first fold's head instead of training the final head "
              "on all examples.")
@click.option("--epochs", type=int, help="Maximum epochs [default: 500 on features, 200 fine-tuning].")
@click.option("--patience", type=int, help="Early-stopping patience in epochs [default: 50 / 20].")
@click.option("--lr", type=float, help="Adam learning rate [default: 1e-2 on features, 1e-3 fine-tuning].")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--class-weights", type=click.Choice(["balanced", "none"]), default="balanced", show_default=True,
              help="balanced weighs each class by the inverse of its frequency (imbalanced data).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--softmax/--logits", default=None, help="End with Softmax or output logits [default: as the old "
              "head did].")
@click.option("--output-name", help="Name of the new output [default: logits or probabilities].")
@click.option("--finetune-last", type=int, help="Torch source only: also train the last N blocks of the backbone.")
@click.option("--weights", help="Torch factory source: a state_dict file.")
@click.option("--input-shape", help="Torch factory source: input shape, e.g. 1x1x8x8.")
@click.option("--cache-dir", type=click.Path(), help="Feature cache folder [default: ~/.cache/onnxopt].")
@click.option("--no-cache", is_flag=True, help="Do not read or write cached features.")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar JSON.")
def head(model, output, data, test_data, cut, kind, hidden, classes, per_class, class_names, val_fraction, no_refit,
         epochs, patience, lr, weight_decay, class_weights, seed, softmax, output_name, finetune_last, weights,
         input_shape, cache_dir, no_cache, as_json):
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
    from .head import head as api_head
    from .report import table, to_json

    side = api_head(model, output, data=data, test_data=test_data, cut=cut, kind=kind, hidden=hidden, classes=classes,
                    per_class=per_class, class_names=class_names, val_fraction=val_fraction, refit=not no_refit,
                    epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay, class_weights=class_weights,
                    seed=seed, softmax=softmax, output_name=output_name, finetune_last=finetune_last, weights=weights,
                    input_shape=input_shape, cache_dir=cache_dir, cache=not no_cache)
    if as_json:
        click.echo(to_json(side))
        return
    h = side["head"]
    if h["route"] == "features":
        click.echo(f"{output}: {h['head']} head on '{h['cut']}' ({h['cut_why']}), {h['classes']} classes "
                   f"({', '.join(h['labels'])}), output '{h['output']}'")
        rows = [[("* " if c["chosen"] else "  ") + c["name"], c["op"], c["features"], _pct(c["val_acc"])]
                for c in h["candidates"]]
        click.echo(table(["cut candidate", "op", "features", "val acc (CV)"], rows, "llrr"))
        ver = side["verification"]
        click.echo(f"graft check on {ver['data']} ({ver['samples']}): max abs error {ver['max_abs_err']:.2e}, "
                   f"top-1 agreement {ver['top1_agreement']:.3f} -- {'passed' if ver['passed'] else 'FAILED'}")
    else:
        click.echo(f"{output}: new {h['head']} head, last {h['finetune_last']} of {h['blocks']} block(s) fine-tuned "
                   f"({h['trainable_params']:,} trainable parameters), {h['classes']} classes; export verified "
                   "against torch")
    click.echo(f"{h['samples']} training examples; accuracy train {_pct(h['train_acc'])}, val {_pct(h['val_acc'])}, "
               f"test {_pct(h['test_acc'])}" + (f" ({h['test_data']}, {h['test_samples']})" if h.get("test_data") else ""))


@click.command("distill", context_settings=CONTEXT)
@click.argument("teacher")
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the student .onnx file.")
@click.option("--data", default="digits", show_default=True, help="Training inputs (labels optional): 'digits' "
              "(its train split), an .npz, an image folder or module:function.")
@click.option("--student", default="digits-cnn", show_default=True,
              help="A built-in student family (digits-cnn) or a factory module:function.")
@click.option("--width", type=float, default=0.4, show_default=True,
              help="Channel multiplier of a built-in student, rounded to multiples of 8 channels (0.4: 16/24 "
              "channels, 0.16x the digits-cnn parameters).")
@click.option("--unlabelled", help="More training inputs without labels (teacher targets only).")
@click.option("--test-data", help="Labelled data to compare teacher and student [default: digits test split "
              "when training on digits].")
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Softmax temperature of the KL loss.")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Weight of the label loss (1 = labels alone, 0 = teacher alone).")
@click.option("--hint-weight", type=float, default=0.0, show_default=True,
              help="Weight of the feature (hint) loss on the teacher's classifier input.")
@click.option("--hint", help="ONNX teacher: the tensor the hint loss matches [default: its classifier input].")
@click.option("--augment", default="none", show_default=True,
              help="none, shift (images moved up to one pixel; the teacher sees the same view) or a hook "
              "module:function (x, generator) -> x.")
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--batch", type=int, default=64, show_default=True, help="Global batch (split across --nproc).")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate (one-cycle schedule).")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Processes: >1 runs DistributedDataParallel via torch.distributed.run (gloo on CPU, nccl on GPU).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per process.")
@click.option("--checkpoint-dir", type=click.Path(), help="Where the per-epoch checkpoint goes [default: "
              "<output>.ckpt].")
@click.option("--no-resume", is_flag=True, help="Start over even when a checkpoint of the same run exists.")
@click.option("--cache-dir", type=click.Path(), help="Teacher-target cache folder [default: ~/.cache/onnxopt].")
@click.option("--no-cache", is_flag=True, help="Do not read or write cached teacher targets.")
@click.option("--weights", help="Torch factory teacher: a state_dict file.")
@click.option("--input-shape", help="Torch factory teacher: input shape, e.g. 1x1x8x8.")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar JSON.")
def distill(teacher, output, data, student, width, unlabelled, test_data, temperature, alpha, hint_weight, hint,
            augment, epochs, batch, lr, weight_decay, seed, nproc, device, threads, checkpoint_dir, no_resume,
            cache_dir, no_cache, weights, input_shape, as_json):
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
      onnxopt distill teacher.onnx -o s.onnx --student mypkg.nets:small --data train.npz --unlabelled extra.npz
    """
    from .distill import distill as api_distill
    from .report import table, to_json

    side = api_distill(teacher, output, data=data, student=student, width=width, unlabelled=unlabelled,
                       test_data=test_data, temperature=temperature, alpha=alpha, hint_weight=hint_weight, hint=hint,
                       augment=augment, epochs=epochs, batch=batch, lr=lr, weight_decay=weight_decay, seed=seed,
                       nproc=nproc, device=device, threads=threads, checkpoint_dir=checkpoint_dir,
                       resume=not no_resume, cache_dir=cache_dir, cache=not no_cache, weights=weights,
                       input_shape=input_shape)
    if as_json:
        click.echo(to_json(side))
        return
    d = side["distill"]
    resumed = f", resumed after epoch {d['resumed_from_epoch']}" if d.get("resumed_from_epoch") else ""
    click.echo(f"{output}: {d['epochs']} epochs on {d['training_data']} ({d['samples']} samples, {d['labelled']} "
               f"labelled), {d['nproc']} process(es){resumed}; teacher targets {d['teacher_targets']}; "
               "export verified against torch")
    rows = [["teacher", d["teacher"], f"{d['teacher_params']:,}", "1.000x", _pct(d.get("teacher_acc"))],
            ["student", d["student"] + (f" x{d['width']:g}" if d.get("width") else ""), f"{d['student_params']:,}",
             f"{d['params_ratio']:.3f}x", _pct(d.get("student_acc"))]]
    click.echo(table(["", "model", "params", "vs teacher", "test acc"], rows, "llrrr"))
    if d.get("test_data"):
        click.echo(f"on {d['test_data']} ({d['test_samples']}): drop {d['drop_points']:.2f} points, top-1 agreement "
                   f"with the teacher {d['agreement_top1']:.3f}")
