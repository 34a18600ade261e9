"""Thin wrapper: ``python tools/plan.py ARGS`` = ``dist-peft plan ARGS`` (see dist_peft/accounting/cli.py)."""

import sys

from dist_peft.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
