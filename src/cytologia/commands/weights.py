"""`cytologia weights pull NAME... | list [--json] | add FILE [--source URL] | check`: pretrained weights and the
sha256 manifest of models/ (:mod:`cytologia.weights_catalog`, :mod:`cytologia.weights`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cytologia.weights import add_to_manifest, models_dir, read_manifest, verified_path
from cytologia.weights_catalog import CATALOG, CONNECT_TIMEOUT_S, pull, pull_command, weight_status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("pull", "list", "add", "check"))
    parser.add_argument("items", nargs="*", help="catalog names (pull) or weight files (add)")
    parser.add_argument("--source", default="", help="add: where the file came from (recorded in the manifest)")
    parser.add_argument("--models", type=Path, default=None, help="models folder (default $CYTOLOGIA_MODELS or models)")
    parser.add_argument("--from-file", type=Path, default=None, help="pull: take the file from here, not the network")
    parser.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT_S, help="pull: seconds to wait for a server")
    parser.add_argument("--force", action="store_true", help="pull: download again even when present")
    parser.add_argument("--json", action="store_true", help="list: one JSON object for scripts")


def listing(directory: Path) -> dict[str, Any]:
    """Per recipe (every experiment of configs/exp that names catalog weights): each weight present or missing and
    the command that gets the missing ones; the whole catalog; files of the manifest outside the catalog."""
    from cytologia.errors import CytologiaInputError
    from cytologia.recipes import compose_experiment, experiments, named_weights

    status = {name: weight_status(name, directory) for name in CATALOG}
    recipes: dict[str, Any] = {}
    try:
        names = experiments()
    except CytologiaInputError:  # installed package: no configs/ to read recipes from
        names = []
    for exp in names:
        cfg = compose_experiment(exp)
        wanted = list(dict.fromkeys(str(w.value) for w in named_weights(cfg) if w.catalog))
        if not wanted:
            continue
        missing = [n for n in wanted if status[n]["state"] != "present"]
        recipes[exp] = {
            "weights": {n: status[n]["state"] for n in wanted},
            "missing": missing,
            "command": pull_command(missing) if missing else "",
        }
    files = {e.file for e in CATALOG.values()}
    other = {name: entry for name, entry in read_manifest(directory).items() if name not in files}
    return {"models_dir": str(directory), "recipes": recipes, "catalog": status, "manifest_only": other}


def _print_listing(data: dict[str, Any]) -> None:
    print(f"recipes (experiments naming pretrained weights; models folder {data['models_dir']}):")
    for exp, r in data["recipes"].items():
        have = sum(state == "present" for state in r["weights"].values())
        line = f"  {exp:20s} {have}/{len(r['weights'])} present"
        print(line + (f"; missing: {', '.join(r['missing'])} -> {r['command']}" if r["missing"] else ""))
    print("catalog:")
    for name, s in data["catalog"].items():
        print(f"  {s['state']:12s} {name:44s} {s['file']:48s} {s['licence']:14s} {s['url']}")
    for name, entry in data["manifest_only"].items():
        print(f"  {'registered':12s} {name:44s} (not in the catalog) {entry.get('source', '')}")


def run(args: argparse.Namespace) -> int:
    directory = args.models or models_dir()
    if args.action == "pull":
        if not args.items:
            print(f"name what to pull: {', '.join(sorted(CATALOG))} (`cytologia weights list` shows what recipes need)")
            return 2
        for result in pull(args.items, directory, from_file=args.from_file, timeout=args.timeout, force=args.force):
            print(result.line())
        return 0
    if args.action == "add":
        for file in map(Path, args.items):
            entry = add_to_manifest(file, args.source, directory)
            print(f"added {file.name}: sha256 {entry['sha256']} ({entry['size']} B)")
        return 0
    if args.action == "list":
        data = listing(Path(directory))
        if args.json:
            print(json.dumps(data, indent=1, default=str))
        else:
            _print_listing(data)
        return 0
    entries = read_manifest(directory)
    bad = 0
    for name in sorted(entries):
        if not (Path(directory) / name).is_file():
            print(f"absent   {name}")
            continue
        try:
            verified_path(name, directory)
            print(f"ok       {name}")
        except ValueError as err:
            bad += 1
            print(f"MISMATCH {err}")
    print(f"{len(entries)} listed, {bad} mismatched")
    return 1 if bad else 0
