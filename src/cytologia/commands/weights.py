"""`cytologia weights add FILE [--source URL]` / `cytologia weights check`: the sha256 manifest of models/."""

from __future__ import annotations

import argparse
from pathlib import Path

from cytologia.weights import add_to_manifest, models_dir, read_manifest, verified_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("add", "check", "list"))
    parser.add_argument("files", nargs="*", type=Path, help="weight files (add)")
    parser.add_argument("--source", default="", help="where the file came from (recorded in the manifest)")
    parser.add_argument("--models", type=Path, default=None, help="models folder (default $CYTOLOGIA_MODELS or models)")


def run(args: argparse.Namespace) -> int:
    directory = args.models or models_dir()
    if args.action == "add":
        for file in args.files:
            entry = add_to_manifest(file, args.source, directory)
            print(f"added {file.name}: sha256 {entry['sha256']} ({entry['size']} B)")
        return 0
    entries = read_manifest(directory)
    bad = 0
    for name, entry in sorted(entries.items()):
        if args.action == "list":
            print(f"{name}  {entry['sha256']}  {entry.get('size', '?')} B  {entry.get('source', '')}")
            continue
        if not (directory / name).is_file():
            print(f"absent   {name}")
            continue
        try:
            verified_path(name, directory)
            print(f"ok       {name}")
        except ValueError as err:
            bad += 1
            print(f"MISMATCH {err}")
    if args.action == "check":
        print(f"{len(entries)} listed, {bad} mismatched")
    return 1 if bad else 0
