"""Every `clipseek` subcommand says what it does on its --help page, and every option says what it is for."""

import argparse

import pytest

from clipseek.cli import build_parser


def _subcommands():
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub


def _undocumented(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        if not (action.help or "").strip():
            yield "/".join(action.option_strings) or action.dest


def test_every_subcommand_has_a_description_and_a_summary():
    _, sub = _subcommands()
    summaries = {a.dest: a.help for a in sub._choices_actions}
    assert set(summaries) == set(sub.choices)
    for name, parser in sub.choices.items():
        assert (summaries[name] or "").strip(), f"{name}: no summary in `clipseek --help`"
        assert (parser.description or "").strip(), f"{name}: no description= on its --help page"
        assert " ".join(parser.description.split()) in " ".join(parser.format_help().split())


@pytest.mark.parametrize("name", sorted(_subcommands()[1].choices))
def test_every_argument_of_a_subcommand_has_a_help_text(name):
    parser = _subcommands()[1].choices[name]
    missing = list(_undocumented(parser))
    assert not missing, f"clipseek {name}: no help text for {', '.join(missing)}"


def test_every_top_level_argument_has_a_help_text():
    parser, _ = _subcommands()
    assert not list(_undocumented(parser))
