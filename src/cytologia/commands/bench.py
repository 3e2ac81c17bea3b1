"""`cytologia bench NAME [options]`: run one benchmark; `cytologia bench NAME --help` lists its options.

Each benchmark is a module with ``add_arguments(parser)`` and ``run(args) -> int``, imported only when it runs (as
in :mod:`cytologia.cli`). Adding a benchmark = adding a module and one line to :data:`BENCHES`.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from cytologia.errors import CytologiaInputError

# name -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "score": ("cytologia.commands.bench_score", "vectorised challenge score vs the per-image loop, on the real table"),
    "synth": ("cytologia.commands.bench_synth", "synthetic data generation speed"),
    "folds": ("cytologia.commands.bench_folds", "fold assignment speed"),
    "pipeline": ("cytologia.commands.bench_pipeline", "inference per stage (decode ... blend), ONNX Runtime vs torch"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark name, and everything after it for the benchmark's own parser."""
    listing = "; ".join(f"{name}: {help_text}" for name, (_, help_text) in BENCHES.items())
    parser.add_argument("name", choices=list(BENCHES), metavar="NAME", help=f"which benchmark ({listing})")
    parser.add_argument(
        "bench_args", nargs=argparse.REMAINDER, metavar="...", help="options of that benchmark (NAME --help)"
    )


def load(name: str) -> ModuleType:
    """The module of benchmark ``name``; a clear :class:`CytologiaInputError` when it is unknown or not installed."""
    if name not in BENCHES:
        raise CytologiaInputError(f"unknown benchmark {name!r}; known: {', '.join(BENCHES)}")
    module_name = BENCHES[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only the benchmark's own module (or its package) being absent is "not available"; a missing dependency
        # inside an existing module is a real error and keeps its traceback.
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise
        raise CytologiaInputError(
            f"benchmark {name!r} is not available in this installation (module {module_name} not found)"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Parse the benchmark's own options and run it."""
    module = load(args.name)
    parser = argparse.ArgumentParser(prog=f"cytologia bench {args.name}", description=BENCHES[args.name][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.bench_args)) or 0)
