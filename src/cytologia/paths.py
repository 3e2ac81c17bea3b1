"""Where the source checkout is: the one place library code looks outside the package.

cytologia runs from a source checkout (``pip install -e .``: this file is ``<root>/src/cytologia/paths.py``) or
installed from a wheel (the package alone, in ``site-packages``). Files that live beside the package in a checkout
-- ``configs/`` (e.g. ``configs/cleaning/*.yaml``) and the real tables in ``../shared/data/cytologia`` -- are found
through :func:`project_root`, which is None for an installed package, so that each caller says clearly what to pass
instead of reading a path that happens to lie above ``site-packages``.
"""

from __future__ import annotations

import os
from pathlib import Path

REAL_DATA_ENV = "CYTOLOGIA_REAL_DATA"  # folder of the real train.csv / test.csv, overrides the checkout's default
_PACKAGE_DIR = Path(__file__).resolve().parent  # <root>/src/cytologia in a checkout


def project_root() -> Path | None:
    """The root of the source checkout cytologia is imported from (the folder holding ``pyproject.toml``,
    ``configs/`` and ``src/cytologia/``), or None when cytologia is installed rather than run from a checkout."""
    src = _PACKAGE_DIR.parent
    root = src.parent
    if src.name == "src" and (root / "pyproject.toml").is_file():
        return root
    return None


def real_data_dir() -> Path | None:
    """The folder of the real Cytologia tables: ``$CYTOLOGIA_REAL_DATA``, else ``shared/data/cytologia`` beside the
    checkout (``<root>/../shared/data/cytologia``); None for an installed package without the variable. The folder
    is not checked: callers say which file is missing."""
    env = os.environ.get(REAL_DATA_ENV)
    if env:
        return Path(env)
    root = project_root()
    return None if root is None else root.parent / "shared" / "data" / "cytologia"


def require_new_folder(path: str | Path, what: str) -> Path:
    """``path`` when it does not exist or is an empty folder (a command writing a new data or run folder); otherwise a
    :class:`~cytologia.errors.CytologiaInputError` saying so -- nothing is ever written over."""
    from cytologia.errors import CytologiaInputError

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CytologiaInputError(f"{path} exists and is not an empty folder: {what} into a new folder")
    return path
