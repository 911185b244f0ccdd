"""What the command-line scripts share beyond their flags (simudy/flags.py): `run_main`, which runs
`parse_args() -> main(args)` and turns a UserError into one line on stderr and exit code 2.

The method itself lives in the simudy/ package (README: code map); the scripts are thin CLIs over it.
"""
import sys

from simudy.errors import UserError


def run_main(main, parse_args):
    """`parse_args() -> main(args)`, turning a UserError into a one-line message and exit code 2."""
    try:
        return main(parse_args())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
