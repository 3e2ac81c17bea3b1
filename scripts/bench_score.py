#!/usr/bin/env python
"""Score benchmark: ``python scripts/bench_score.py [options]`` is ``cytologia bench score [options]``.

Times the vectorised challenge score against the plain per-image loop on the real train.csv (or --truth/--pred)
and checks they agree; see :mod:`cytologia.commands.bench_score`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cytologia.commands import bench_score
from cytologia.errors import CytologiaInputError


def main(argv: list[str] | None = None) -> int:
    """Parse the benchmark's options and run it; bad input exits 2 with the message, as the CLI does."""
    parser = argparse.ArgumentParser(prog="bench_score.py", description=__doc__.splitlines()[0])
    bench_score.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return bench_score.run(args)
    except CytologiaInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
