"""`cytologia export detector --weights W --out model.onnx --img-size 512`: ONNX export, verified against torch;
`cytologia export ensemble --ensemble FILE --out DIR`: a portable inference bundle (:mod:`cytologia.ensemble.bundle`).

The checkpoint may be of any detector backend: the backend is read from the file. After writing the graph the
command runs it with ONNX Runtime next to the torch checkpoint on the same images (``--images DIR``, or a few
generated smears) and fails (exit 1) when they differ beyond the tolerances of :mod:`cytologia.detection.export`.
``--bench`` adds detection ms/image on the CPU, torch vs ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cytologia.errors import CytologiaInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    from cytologia.detection.export import BOX_ATOL_PX, RAW_BOX_ATOL_PX, RAW_SCORE_ATOL

    det = sub.add_parser(
        "detector",
        help="a trained detector checkpoint (detector.pt) to ONNX",
        description="Export a trained detector checkpoint to ONNX, then run both on the same images: exit status 1 "
        f"when ONNX Runtime and torch differ by more than {RAW_BOX_ATOL_PX:g} px (raw boxes, network input) or "
        f"{RAW_SCORE_ATOL:g} (raw scores), or when a box after NMS is more than {BOX_ATOL_PX:g} image px from "
        "every box of the other side.",
    )
    det.add_argument("--weights", type=Path, required=True, help="trained checkpoint (fold_K/detector.pt), any backend")
    det.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    det.add_argument("--img-size", type=int, default=512, help="network input side the graph is traced at (512)")
    det.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's choice)")
    det.add_argument("--images", type=Path, default=None, help="folder of images to verify on (default: generated)")
    det.add_argument("--n-verify", type=int, default=8, help="images used for the parity check (8)")
    det.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch check")
    det.add_argument("--bench", action="store_true", help="also time detection on the CPU, torch vs ONNX Runtime")
    det.add_argument("--threads", type=int, default=2, help="CPU threads for --bench (2)")
    det.add_argument("--bench-batch", type=int, default=1, help="images per forward pass for --bench (1)")
    det.add_argument("--report", type=Path, default=None, help="write the parity/bench results as JSON here")
    ens = sub.add_parser(
        "ensemble",
        help="a portable inference bundle: ONNX files, ensemble file with relative paths, class list, checksums",
        description="Write one self-contained folder that cytologia predict --ensemble DIR reads on another machine, "
        "with the inference dependencies only (pip install 'cytologia[infer]': no torch). Models listed only as "
        "checkpoints are exported to ONNX once. See docs/prediction.md.",
    )
    ens.add_argument("--ensemble", type=Path, required=True, help="ensemble file (cytologia tune) or a bundle")
    ens.add_argument("--out", type=Path, required=True, help="bundle folder to write (must not exist, or be empty)")
    ens.add_argument("--force", action="store_true", help="replace --out when it exists")


def _images(folder: Path, n: int) -> list[Path]:
    if not folder.is_dir():
        raise CytologiaInputError(f"{folder}: no such image folder")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise CytologiaInputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return found[:n]


def run(args: argparse.Namespace) -> int:
    if args.what == "ensemble":
        from cytologia.ensemble.bundle import export_bundle

        print(export_bundle(args.ensemble, args.out, overwrite=args.force).summary())
        return 0
    from cytologia.detection.base import MAX_STRIDE
    from cytologia.detection.export import benchmark, export_detector, generated_images, verify_onnx

    if args.img_size < MAX_STRIDE or args.img_size % MAX_STRIDE:
        raise CytologiaInputError(f"--img-size {args.img_size} must be a positive multiple of {MAX_STRIDE}")
    if args.n_verify < 1:
        raise CytologiaInputError(f"--n-verify {args.n_verify} must be >= 1")
    detector, path = export_detector(args.weights, args.out, args.img_size, opset=args.opset)
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({size_mb:.1f} MB) from {args.weights} ({detector.backend}/{detector.model})")
    results: dict[str, object] = {"onnx": str(path), "weights": str(args.weights), "img_size": args.img_size}
    ok = True
    with tempfile.TemporaryDirectory(prefix="cytologia-export-") as tmp:
        images = _images(args.images, args.n_verify) if args.images else generated_images(tmp, args.n_verify)
        if not args.no_verify:
            report = verify_onnx(detector, path, images, args.img_size)
            print(report.summary())
            results["parity"] = report.as_dict()
            ok = report.passed
        if args.bench:
            timing = benchmark(detector, path, images, args.img_size, threads=args.threads, batch_size=args.bench_batch)
            print(
                f"detection on {timing['n_images']} images, {args.threads} thread(s), batch {args.bench_batch}: "
                f"torch {timing['torch_ms_per_image']:.1f} ms/image, "
                f"ONNX Runtime {timing['onnxruntime_ms_per_image']:.1f} ms/image"
            )
            results["bench"] = timing
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if ok else 1
