"""`shears`: the command line. Each package adds its own subcommands through `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Packages whose `cli.register` adds subcommands; a package whose dependencies are missing (the
# server's on a bare GPU box) is skipped so the engine and kernels still work there.
_PLUGINS = ("pruning.cli_prune", "kernels.cli", "server.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shears", description="One-shot LLM pruning: engine, kernels, server."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            ours = exc.name and exc.name.split(".")[0] in {"pruning", "kernels", "server", "calibration"}
            if ours and exc.name != name:
                raise
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
