"""``python -m cytologia ...`` = the ``cytologia`` command (and ``torchrun -m cytologia predict ...``)."""

import sys

from cytologia.cli import main

if __name__ == "__main__":
    sys.exit(main())
