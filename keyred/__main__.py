"""`python -m keyred <stage> ...`: the `keyred` command (keyred.cli)."""

import sys

from keyred.cli import main

if __name__ == "__main__":
    sys.exit(main())
