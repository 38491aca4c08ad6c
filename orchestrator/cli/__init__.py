"""`flotilla`: the command line. One module per command in this package.

Each command module defines `register(commands)`: it adds its subparser to
`commands` (an argparse subparsers object) and sets `run=callable(args) -> int`.
Modules are found by name, so a new command is a new file here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from orchestrator.config import ConfigError


def _command_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):  # _private helpers and __main__
            yield importlib.import_module(f"{__name__}.{info.name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build-model"]:  # its own parser, shared with `python -m orchestrator.local_model`
        from orchestrator.local_model import main as build_model

        return build_model(argv[1:])
    parser = argparse.ArgumentParser(prog="flotilla", description="Serve LLMs across a mixed GPU fleet.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("build-model", add_help=False, help="build the local model (tokenizer + tiny Llama)")
    for module in _command_modules():
        module.register(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
