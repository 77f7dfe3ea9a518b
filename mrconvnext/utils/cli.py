"""Command-line pieces every tool shares: the error a tool reports as one line, the ``--help`` layout,
``--model-kwargs KEY=VALUE`` parsing and the ranges of numeric flags."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from typing import Any

from timm.utils import ParseKwargs as _TimmParseKwargs

__all__ = ["HelpFormatter", "InputError", "ParseKwargs", "add_model_kwargs_argument", "out_of_range"]


class InputError(ValueError):
    """What a tool was given is wrong (a flag, a data file, a checkpoint): the message names it and what was
    expected, and the tool prints it as one ``prog: error: ...`` line, without a traceback. The base of the
    package's error types for bad input (``DataFormatError``, ``CheckpointError``, ``PreflightError``, ...)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with every option's default, ``(default: ...)``, as ``ArgumentDefaultsHelpFormatter`` writes
    it; also for options without help text, and not where the default is None, off or empty, or the help already
    says what the default is."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            return False
        if action.default in (None, False, "", argparse.SUPPRESS) or action.default == {}:
            return False
        return "default" not in (action.help or "")

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if self._shows_default(action) and "%(default)" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


class ParseKwargs(_TimmParseKwargs):
    """timm's ``--model-kwargs KEY=VALUE ...`` (values read as Python literals, else strings); a word without ``=``
    is a usage error naming it, instead of a traceback."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Sequence[str] | None,
        option_string: str | None = None,
    ) -> Any:
        values = list(values or ())
        for index, value in enumerate(values):
            if "=" not in value.lstrip("="):
                following = values[index + 1] if index + 1 < len(values) else ""
                fix = f"{value}={following}" if following and "=" not in following else f"{value}=VALUE"
                raise argparse.ArgumentError(self, f"{value!r} is not KEY=VALUE; did you mean {fix}?")
        return super().__call__(parser, namespace, values, option_string)


def add_model_kwargs_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str = "extra create_model kwargs"
) -> None:
    """``--model-kwargs KEY=VALUE ...`` (:class:`ParseKwargs`), as every tool spells it."""
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE", help=help)


def out_of_range(
    args: argparse.Namespace,
    positive: Sequence[str] = (),
    non_negative: Sequence[str] = (),
    fractions: Sequence[str] = (),
    probabilities: Sequence[str] = (),
) -> str | None:
    """What is wrong with the first flag out of its range (``positive``, ``non_negative``, a fraction in ``[0, 1)``
    such as a dropout rate, a probability in ``[0, 1]``), or None. Checked on the parsed values, so a ``--config``
    file's too; flags that are None (unset, or not a flag of this tool) are not checked. Each tool raises it as
    its own error (one line, no traceback)."""
    checks = (
        (positive, lambda v: v > 0, "positive"),
        (non_negative, lambda v: v >= 0, "non-negative"),
        (fractions, lambda v: 0 <= v < 1, "in [0, 1)"),
        (probabilities, lambda v: 0 <= v <= 1, "in [0, 1]"),
    )
    for names, valid, expected in checks:
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not valid(value):
                return f"--{name.replace('_', '-')} must be {expected}, got {value}"
    return None
