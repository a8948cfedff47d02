"""The ``gradbridge`` command line: ``demo`` checks the built-in examples, ``backends`` lists frameworks."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import _registry


def _backends_command(_: argparse.Namespace) -> int:
    for name in _registry.KNOWN_BACKENDS:
        if name in _registry.available_backends():
            adapter = _registry.get_adapter(name)
            print(f"{name:<11} installed   {adapter.version()}")
        elif _registry.framework_installed(name):
            print(f"{name:<11} installed   (no gradbridge adapter yet)")
        else:
            print(f"{name:<11} missing     {_registry.install_hint(name)}")
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from .backends.demos import run_demo

    return run_demo(args.backend)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gradbridge", description="Check gradients against finite differences.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="check the built-in examples (a correct and a buggy op per backend)")
    demo.add_argument("--backend", action="append", help="only this backend (repeatable); default: every installed one")
    demo.set_defaults(run=_demo_command)
    backends = commands.add_parser("backends", help="list the frameworks gradbridge can use here")
    backends.set_defaults(run=_backends_command)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
