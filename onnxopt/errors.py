"""Errors a user can cause, and how the CLI reports them.

This module does not import click, so API users can catch these errors. The CLI prints
``<where>: <problem>[; <hint>]`` on one line and exits with ``exit_code``:

* 2 -- bad input, usage or configuration (:class:`BadInput` and subclasses);
* 3 -- a verification or a gate failed that a correct program can fail
  (:class:`VerificationFailed`, :class:`GateFailed`);
* 1 -- onnxopt itself got something wrong (:class:`InternalError`, e.g. ONNX Runtime cannot run a
  file onnxopt wrote, or a pass broke its own invariant), or any other exception: the CLI shows
  the full traceback.

Every error carries what it has to show besides its line (a verification table, a search report)
in its ``report`` field.
"""

from __future__ import annotations

__all__ = [
    "OnnxoptError",
    "BadInput",
    "MissingDependency",
    "VerificationFailed",
    "GateFailed",
    "InternalError",
    "check_choice",
    "first_line",
]


class OnnxoptError(Exception):
    """Base of every error a user can cause. ``where`` names the file, model or option."""

    exit_code = 1

    def __init__(self, where: str, problem: str, hint: str | None = None, *, report: dict | None = None):
        self.where = str(where)
        self.problem = problem
        self.hint = hint
        self.report = report
        super().__init__(self.one_line())

    def __reduce__(self):  # pickled intact across processes (a Ray task's error reaches the driver)
        return (_restore, (type(self), dict(self.__dict__)))

    def one_line(self) -> str:
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        if self.hint:
            text += f"; {self.hint}"
        # One line, always: exporters and parsers put newlines in their messages.
        return " ".join(text.split())


def _restore(cls, state: dict) -> OnnxoptError:
    e = cls.__new__(cls)
    e.__dict__.update(state)
    Exception.__init__(e, e.one_line())
    return e


class BadInput(OnnxoptError):
    """A missing or corrupt file, a wrong shape, an unknown name, a bad option value."""

    exit_code = 2


class MissingDependency(BadInput):
    """An optional dependency (torch, transformers, ...) is needed but not installed."""

    def __init__(self, what: str, package: str, extra: str):
        super().__init__(
            what,
            f"needs the Python package '{package}', which is not installed",
            f"install it with: pip install 'onnxopt[{extra}]' (see README for the CPU-only torch pin)",
        )


class VerificationFailed(OnnxoptError):
    """A produced model does not match its reference within the stated tolerance."""

    exit_code = 3


class GateFailed(OnnxoptError):
    """An accuracy or speed gate did not hold."""

    exit_code = 3


class InternalError(OnnxoptError):
    """onnxopt's own code or output is wrong: ONNX Runtime fails on a model onnxopt produced, a
    pass breaks an invariant it promised (``ensures``). A bug to report, never the user's fault:
    exit 1, and the CLI shows the traceback."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), at
    most ``limit`` characters: what a one-line error quotes from a library's multi-line message."""
    for line in str(exc).strip().splitlines():
        # protobuf's parse errors start with '==> context' lines that say nothing to a user
        if line.strip() and not line.strip().startswith("==>"):
            return line.strip()[:limit]
    return type(exc).__name__


def check_choice(value, allowed, flag: str, hint: str | None = None) -> None:
    """Raise :class:`BadInput` naming ``flag`` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise BadInput(flag, f"'{value}' is not one of {', '.join(allowed)}", hint)
