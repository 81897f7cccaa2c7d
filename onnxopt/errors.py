"""Errors a user can cause, and how the CLI reports them.

This module does not import click, so API users can catch these errors. The CLI prints
``<where>: <problem>[; <hint>]`` on one line and exits with ``exit_code``:

* 2 -- bad input, usage or configuration (:class:`BadInput` and subclasses);
* 3 -- a verification or a gate failed (:class:`VerificationFailed`, :class:`GateFailed`).

Anything else that escapes is a bug: the CLI shows the full traceback and exits 1.
"""

from __future__ import annotations

__all__ = [
    "OnnxoptError",
    "BadInput",
    "MissingDependency",
    "VerificationFailed",
    "GateFailed",
    "check_choice",
]


class OnnxoptError(Exception):
    """Base of every error a user can cause. ``where`` names the file, model or option."""

    exit_code = 1

    def __init__(self, where: str, problem: str, hint: str | None = None):
        self.where = str(where)
        self.problem = problem
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        if self.hint:
            text += f"; {self.hint}"
        # One line, always: exporters and parsers put newlines in their messages.
        return " ".join(text.split())


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


def check_choice(value, allowed, flag: str, hint: str | None = None) -> None:
    """Raise :class:`BadInput` naming ``flag`` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise BadInput(flag, f"'{value}' is not one of {', '.join(allowed)}", hint)
