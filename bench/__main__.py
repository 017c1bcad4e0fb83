"""``python -m bench``: run the bench suite (see :func:`bench.cli.main`)."""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
