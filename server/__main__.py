"""`python -m server COMMAND`: the server's subcommands without the other packages' (what workers run)."""

from __future__ import annotations

import argparse
import sys

from shears.server.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shears", description="Shears job server")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
