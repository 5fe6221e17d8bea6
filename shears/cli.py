"""`shears`: the command line. Each package adds its own subcommands through `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules whose `register` adds subcommands. The floor names them by string (and imports nothing
# else of Shears): a part whose dependencies are missing (the server's on a bare GPU box) is
# skipped so the engine and kernels still work there.
_PLUGINS = ("shears.pruning.cli_prune", "shears.kernels.cli", "shears.server.cli", "shears.client.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shears", description="One-shot LLM pruning: engine, kernels, server."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if exc.name and exc.name.startswith("shears") and exc.name != name:
                raise  # a bug of ours, not a missing optional dependency
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
