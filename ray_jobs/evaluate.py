"""`ray job submit` entrypoint for evaluation: the same arguments as `multimix evaluate`."""

import sys

from multimix.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
