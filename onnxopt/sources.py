"""Resolve what the user names as a model: a built-in name, a ``.onnx`` file, or a Python
factory ``package.module:function`` returning an ``nn.Module`` (with optional weights)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path

import numpy as np

from .errors import BadInput, MissingDependency, first_line
from .spec import InputSpec, ModelSpec

__all__ = ["is_onnx_path", "is_factory", "resolve", "parse_shape", "require_torch", "last_linear"]

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def require_torch(what: str):
    try:
        import torch
    except ImportError:
        raise MissingDependency(what, "torch", "torch") from None
    return torch


def last_linear(torch, net):
    """The last ``nn.Linear`` of ``net`` (its classifier), or None."""
    last = None
    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    return last


def is_onnx_path(name: str) -> bool:
    return str(name).lower().endswith(".onnx") or (os.path.sep in str(name) and Path(name).is_file())


def is_factory(name: str) -> bool:
    return bool(_FACTORY.match(str(name)))


def parse_shape(text: str, where: str = "--input-shape") -> tuple[int, ...]:
    """``1x3x224x224`` -> (1, 3, 224, 224)."""
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise BadInput(where, f"'{text}' is not a shape", "write it like 1x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise BadInput(where, f"'{text}' has a dimension <= 0")
    return dims


def call_ref(ref: str, what: str = "factory"):
    """Import ``module:function`` or ``path/to/file.py:function`` (the working folder on the
    path), call the function and return what it returned. Every failure is a one-line
    :class:`BadInput` naming ``ref``. The one loader of user code: model factories, data functions."""
    mod_name, fn_name = ref.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            if not Path(mod_name).is_file():
                raise BadInput(ref, f"no such file {mod_name}")
            loader = importlib.util.spec_from_file_location(f"onnxopt_user_{Path(mod_name).stem}", mod_name)
            mod = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(mod_name)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(ref, f"cannot import module '{mod_name}' ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise BadInput(ref, f"module '{mod_name}' has no callable '{fn_name}'")
    try:
        return fn()
    except Exception as e:
        raise BadInput(ref, f"the {what} raised {type(e).__name__}: {e}") from None


def call_factory(torch, ref: str, what: str = "factory"):
    """:func:`call_ref` for a model factory: what it returns must be a ``torch.nn.Module``."""
    net = call_ref(ref, what)
    if not isinstance(net, torch.nn.Module):
        raise BadInput(ref, f"the {what} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def resolve(
    model: str,
    *,
    input_shape: str | tuple | None = None,
    dtype: str = "float32",
    weights: str | None = None,
    task: str | None = None,
    dynamic_batch: bool = True,
) -> ModelSpec:
    """A :class:`ModelSpec` for a built-in name or a factory. ``.onnx`` paths are not torch
    sources: callers check :func:`is_onnx_path` first."""
    from . import zoo

    if is_factory(model):
        return _factory_spec(model, input_shape, dtype, weights, task, dynamic_batch)
    if weights is not None:
        raise BadInput("--weights", f"only applies to a factory model, not to built-in '{model}'")
    return zoo.get(model)


def _factory_spec(ref, input_shape, dtype, weights, task, dynamic_batch) -> ModelSpec:
    if input_shape is None:
        raise BadInput(ref, "a factory model needs an input shape", "pass --input-shape 1x3x224x224")
    shape = parse_shape(input_shape) if isinstance(input_shape, str) else tuple(input_shape)
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise BadInput("--dtype", f"'{dtype}' is not a dtype") from None
    if weights is not None and not Path(weights).is_file():
        raise BadInput(str(weights), "no such weights file")
    sym_shape = (("batch",) + shape[1:]) if dynamic_batch else shape

    def build():
        torch = require_torch(ref)
        net = call_factory(torch, ref)
        if weights is not None:
            _load_weights(torch, net, weights)
        return net.eval()

    def sample(batch: int, seq: int | None = None, seed: int = 0):
        rng = np.random.default_rng(seed)
        full = (batch,) + shape[1:]
        if np_dtype.kind == "f":
            arr = rng.standard_normal(full).astype(np_dtype)
        else:
            arr = rng.integers(0, 100, size=full).astype(np_dtype)
        return {"input": arr}

    return ModelSpec(
        name=ref,
        summary=f"user factory {ref}",
        task=task or "other",
        inputs=(InputSpec("input", sym_shape, np_dtype.name),),
        outputs=("output",),
        build=build,
        sample_inputs=sample,
        exporter="dynamo",
        builtin=False,
        extra={"weights": str(weights) if weights else None, "input_shape": list(shape)},
    )


def _load_weights(torch, net, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(path, f"cannot load weights with torch.load(weights_only=True) ({type(e).__name__})",
                       "save a state_dict with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BadInput(path, f"holds a {type(state).__name__}, not a state_dict")
    try:
        result = net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")
        detail = "; ".join(s.strip() for s in first[1:3]) or first_line(e)
        raise BadInput(path, f"weights do not match the model: {detail[:300]}") from None
    del result


def list_models() -> list[dict]:
    """The built-in models with what each is for (``onnxopt models``)."""
    from . import zoo

    out = []
    for name in zoo.names():
        s = zoo.get(name)
        inputs = ", ".join(f"{i.name} {'x'.join(map(str, i.shape))} {i.dtype}" for i in s.inputs)
        out.append({"name": s.name, "task": s.task, "inputs": inputs, "outputs": list(s.outputs),
                    "dataset": s.dataset, "exporter": s.exporter, "summary": s.summary})
    return out
