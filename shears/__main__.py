"""`python -m shears COMMAND`: the same command line as the `shears` console script."""

import sys

from shears.cli import main

if __name__ == "__main__":
    sys.exit(main())
