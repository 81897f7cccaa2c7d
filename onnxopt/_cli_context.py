"""The click context every command shares (``-h`` as well as ``--help``, 100-column help)."""

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _force_external(ctx, param, value: bool) -> None:
    if value:
        from .artifact import external_data

        scope = external_data(True)
        scope.__enter__()
        ctx.call_on_close(lambda: scope.__exit__(None, None, None))


def external_data_option(f):
    """``--external-data``: every model the command writes keeps its weights in ``<name>.data``
    beside it (a model of 1 GiB or more always does)."""
    import click

    return click.option("--external-data", is_flag=True, expose_value=False, callback=_force_external,
                        help="Write the weights to <model>.onnx.data beside the model (automatic at 1 GiB "
                             "and up).")(f)
