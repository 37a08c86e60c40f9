"""Every command line's --help: each option says what it does and shows its default; a closed
output pipe ends a command quietly."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from cheers.cli import build_parser


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def _forwarded() -> dict[str, str]:
    """``cheers NAME`` -> the ``module:function`` it hands its arguments to."""
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: p.get_default("module") for name, p in sub.choices.items() if p.get_default("module")}


def _parser_of(target: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``module:function([])`` builds, caught as it starts parsing."""

    def caught(self, *args, **kwargs):
        raise _Built(self)

    module, _, fn = target.partition(":")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
    with pytest.raises(_Built) as built:
        getattr(importlib.import_module(module), fn)([])
    return built.value.parser


def _walk(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk(sub)


def _problems(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for p in _walk(parser):
        formatter = p._get_formatter()
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                out.append(f"{p.prog} {name}: no help text")
                continue
            default = action.default
            shown = default is None or default is False or (isinstance(default, (list, tuple)) and not default)
            if not shown and action.option_strings and "default" not in formatter._expand_help(action).lower():
                out.append(f"{p.prog} {name}: its default {default!r} is not shown")
    return out


COMMANDS = ["cheers.cli:build_parser", *sorted(set(_forwarded().values()))]


@pytest.mark.parametrize("target", COMMANDS)
def test_every_option_says_what_it_does_and_its_default(target, monkeypatch):
    if target == "cheers.cli:build_parser":
        parser = build_parser()
    else:
        parser = _parser_of(target, monkeypatch)
    assert _problems(parser) == []


def test_the_check_catches_an_option_without_help():
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--m", type=int, default=3, help="a count")
    assert _problems(p) == ["x --n: no help text", "x --m: its default 3 is not shown"]


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "images per prompt (default: 1)" in text
    assert "images sampled together (default: 4)" in text
    assert "classifier-free guidance scale, >= 0 (default: the checkpoint's)" in text


def test_forwarded_commands_are_all_walked():
    assert {"demo", "debug-checkpoint", "eval", "quantize", "train", "export", "data", "serve"} <= set(_forwarded())


def test_closed_output_pipe_ends_quietly():
    """``cheers info | head -1``: the reader is gone before the output; no traceback."""
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "cheers.cli", "info", "--flavour", "debug"], stdout=write,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    os.close(write)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


def test_head_reads_the_first_line():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(f"{sys.executable} -m cheers.cli info --flavour debug | head -1", shell=True,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1 and proc.stdout.startswith("tokenizer.")
    assert "Traceback" not in proc.stderr, proc.stderr
