"""Every tool's ``--help``: each option's default shown, ``--model`` explained, ``-b`` saying whose batch it is."""

from __future__ import annotations

import argparse
import importlib

import pytest

TOOLS = ("train_imagenet", "train_sequence", "validate", "export", "convert", "plot", "demo", "selfcheck")


def _parser(tool: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"mrconvnext.{tool}").create_parser()


def _option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The lines ``--help`` prints for ``action``, as the parser's formatter writes them."""
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return formatter.format_help()


def _has_default(action: argparse.Action) -> bool:
    """Whether ``action`` has a default worth showing (not None, off, empty or argparse's own)."""
    if isinstance(action, argparse._HelpAction) or not action.option_strings:
        return False
    return action.default not in (None, False, "", argparse.SUPPRESS) and action.default != {}


@pytest.mark.parametrize("tool", TOOLS)
def test_help_runs_and_shows_every_default(tool, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"mrconvnext.{tool}").main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
    parser = _parser(tool)
    missing = []
    for action in parser._actions:
        if _has_default(action):
            text = _option_help(parser, action)
            if "default" not in text:
                missing.append(text.strip())
    assert not missing, f"{tool} --help hides these defaults:\n" + "\n".join(missing)


@pytest.mark.parametrize("tool", [t for t in TOOLS if t != "selfcheck"])
def test_model_flag_is_explained(tool) -> None:
    parser = _parser(tool)
    (action,) = (a for a in parser._actions if "--model" in a.option_strings)
    assert action.help and len(action.help) > 20, f"{tool} --model: {action.help!r}"


def test_batch_size_says_whose_batch_it_is() -> None:
    helps = {}
    for tool in ("train_imagenet", "train_sequence"):
        (action,) = (a for a in _parser(tool)._actions if "-b" in a.option_strings)
        helps[tool] = action.help
    assert "per process" in helps["train_imagenet"] and "global batch" in helps["train_imagenet"]
    assert "global" in helps["train_sequence"] and "all processes" in helps["train_sequence"]
