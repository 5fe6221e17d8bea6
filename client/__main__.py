"""`python -m shears.client COMMAND`: the client's subcommands alone (no torch, no server packages)."""

from __future__ import annotations

import argparse
import sys

from shears.client.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shears", description="Shears client")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
