"""The catalog of pretrained weights the winners' recipes start from, and ``pull``: the one deliberate download.

Training and prediction never download (``import cytologia`` sets ``HF_HUB_OFFLINE=1``): they read weight files
from ``models/`` only, checked against ``models/manifest.json`` (:mod:`cytologia.weights`). A config names its
initial weights by catalog name (``classifier.weights: vit_large_patch16_224.augreg_in21k_ft_in1k``, the timm
pretrained tag; ``detector.weights: yolox_s``), by a file in ``models/``, or asks for random weights explicitly
(``random``). :func:`resolve_weights` turns that value into a verified path, and a catalog name whose file is absent
into an error naming ``cytologia weights pull NAME``.

:func:`pull` is the step a user runs once where there is network. Two routes:

- ``hf``: a file of a Hugging Face repository (timm's ``timm/<tag>`` repos, ``model.safetensors``) through
  ``huggingface_hub`` -- which honours ``HF_ENDPOINT`` (a mirror), ``HF_HOME`` (its cache), ``HF_TOKEN`` and the
  ``HTTPS_PROXY``/``HTTP_PROXY`` variables. The library's ``HF_HUB_OFFLINE=1`` is lifted for this download only.
- ``url``: a plain HTTPS download (the DinoBloom release on Zenodo, the YOLOX and ultralytics GitHub releases) with
  ``urllib``, which honours the same proxy variables.

Both use a short connection timeout, so without network the command fails at once with one line naming the URL and
where to put the file by hand (then ``cytologia weights add``, or ``pull NAME --from-file FILE``). Every pulled file
is hashed: a pinned sha256 (the catalog's, or the manifest's from an earlier pull) that differs refuses the file;
where the catalog pins none (``sha256=None``: not published by the source and not measured here -- recorded on first
pull), the manifest records the hash of that first pull and every later pull or load is checked against it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cytologia.errors import CytologiaInputError
from cytologia.weights import MANIFEST_NAME, add_to_manifest, read_manifest, verified_path

log = logging.getLogger(__name__)

RANDOM = "random"  # the config value that asks for random initial weights
CONNECT_TIMEOUT_S = 10.0  # seconds to wait for a server: no network fails in seconds, not minutes
HF_FILE = "model.safetensors"  # the weight file of a timm/<tag> Hugging Face repository

_ZENODO_DINOBLOOM = "https://zenodo.org/records/10908163/files"  # DinoBloom's published release (Koch et al. 2024)
_YOLOX_RELEASE = "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0"
_ULTRALYTICS_RELEASE = "https://github.com/ultralytics/assets/releases/download/v8.3.0"


@dataclass(frozen=True)
class CatalogEntry:
    """One pretrained weight file: its name in configs, file in ``models/``, where it comes from and what it is."""

    name: str  # what a config names (classifier.weights / detector.weights); a timm pretrained tag for timm files
    file: str  # file name in models/
    route: str  # "hf" (huggingface_hub) | "url" (plain download)
    source: str  # Hugging Face repo id (route hf) or URL (route url)
    licence: str
    arch: str  # the architecture it initialises (timm name, DinoBloom variant, detector model)
    sha256: str | None = None  # pinned hash; None = recorded in the manifest on first pull
    hf_file: str = HF_FILE  # file inside the repository (route hf)
    note: str = ""

    @property
    def url(self) -> str:
        """The address the file is read from (for route hf: the default endpoint's, or ``$HF_ENDPOINT``'s)."""
        if self.route == "url":
            return self.source
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{self.source}/resolve/main/{self.hf_file}"


def _timm(tag: str, licence: str, note: str = "") -> CatalogEntry:
    arch = tag.split(".")[0]
    return CatalogEntry(tag, f"{tag}.safetensors", "hf", f"timm/{tag}", licence, arch, note=note)


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        # 1st place's classifiers (timm pretrained tags; licences as timm's pretrained configs state them)
        _timm("vit_large_patch16_224.augreg_in21k_ft_in1k", "apache-2.0", "1st place ViT-L members"),
        _timm("tf_efficientnetv2_m.in21k", "apache-2.0", "1st place EfficientNetV2-M (crop and multi-label)"),
        _timm("nextvit_large.bd_ssld_6m_in1k_384", "apache-2.0", "1st place NextViT-L 384"),
        _timm("tiny_vit_21m_512.dist_in22k_ft_in1k", "apache-2.0", "1st place TinyViT-21M 512"),
        # DinoBloom S/B/L: DINOv2 training checkpoints (teacher dict), read by cytologia.classification.dinobloom.
        # DinoBloom-S's sha256 is the one the STAMP project pins for the same Zenodo file; B and L: first pull.
        CatalogEntry(
            "dinobloom_s",
            "DinoBloom-S.pth",
            "url",
            f"{_ZENODO_DINOBLOOM}/DinoBloom-S.pth",
            "see zenodo.org/records/10908163",
            "dinobloom_s",
            "c2f7990b003e89bcece80e379fb8fe0ba2ec392ce19b286e8a294abd99568e44",
        ),
        CatalogEntry(
            "dinobloom_b",
            "DinoBloom-B.pth",
            "url",
            f"{_ZENODO_DINOBLOOM}/DinoBloom-B.pth",
            "see zenodo.org/records/10908163",
            "dinobloom_b",
            note="1st place DinoBloom-B member",
        ),
        CatalogEntry(
            "dinobloom_l",
            "DinoBloom-L.pth",
            "url",
            f"{_ZENODO_DINOBLOOM}/DinoBloom-L.pth",
            "see zenodo.org/records/10908163",
            "dinobloom_l",
        ),
        # the official YOLOX COCO checkpoints (80-class head skipped when loading into our 1-class detector)
        *(
            CatalogEntry(m, f"{m}.pth", "url", f"{_YOLOX_RELEASE}/{m}.pth", "apache-2.0", m, note="COCO, 80 classes")
            for m in ("yolox_nano", "yolox_tiny", "yolox_s", "yolox_m", "yolox_l", "yolox_x")
        ),
        # ultralytics YOLO11 COCO checkpoints (AGPL-3.0, like the ultralytics package)
        *(
            CatalogEntry(m, f"{m}.pt", "url", f"{_ULTRALYTICS_RELEASE}/{m}.pt", "agpl-3.0", m, note="COCO, 80 classes")
            for m in ("yolo11n", "yolo11s", "yolo11m", "yolo11l", "yolo11x")
        ),
    )
}


def catalog_entry(name: str) -> CatalogEntry:
    """The catalog entry ``name``; an unknown name is an error listing the catalog."""
    if name not in CATALOG:
        raise CytologiaInputError(f"{name!r} is not in the weights catalog; known: {', '.join(sorted(CATALOG))}")
    return CATALOG[name]


def pull_command(names: Iterable[str]) -> str:
    return "cytologia weights pull " + " ".join(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------- run time: offline
def resolve_weights(value: str | None, models_dir: str | Path | None = None, key: str = "weights") -> Path | None:
    """The verified weight file a config value names, or None for ``random``.

    ``value``: ``random``; a catalog name (its file must be in ``models_dir``, else the error names the pull
    command); or a file (a path, or a bare name in ``models_dir``) listed in its folder's manifest. ``None`` is an
    error: random weights must be asked for (``random``), so that forgetting the weights never trains silently from
    scratch. ``key`` names the config key in messages.
    """
    directory = Path(models_dir) if models_dir is not None else None
    if value is None:
        raise CytologiaInputError(
            f"config key {key} is null: name the initial weights (a catalog name such as a timm pretrained tag, see "
            f"`cytologia weights list`, or a file in models/) or write {key}={RANDOM} to train from random weights"
        )
    value = str(value)
    if value == RANDOM:
        return None
    if value in CATALOG:
        entry = CATALOG[value]
        folder = directory if directory is not None else _default_models_dir()
        path = folder / entry.file
        if not path.is_file():
            raise CytologiaInputError(
                f"{key}={value}: {path} is absent. Get it where there is network with "
                f"`{pull_command([value])}` (add --models {folder} for another folder), or download {entry.url} "
                f"by hand, place it as {path} and run `cytologia weights add {path} --source {entry.url}`"
            )
        return verified_path(path, folder)
    given = Path(value).expanduser()
    if given.is_file():
        return verified_path(given, given.parent)
    return verified_path(given, directory)


def _default_models_dir() -> Path:
    from cytologia.weights import models_dir

    return models_dir()


# ------------------------------------------------------------------------------------------------ the download
@dataclass
class PullResult:
    """One pulled (or already present) file."""

    name: str
    path: Path
    sha256: str
    size: int
    source: str
    licence: str
    status: str  # "downloaded" | "present" | "from-file"

    def line(self) -> str:
        return f"{self.status:10s} {self.name}: {self.path} ({self.size / 1e6:.1f} MB, sha256 {self.sha256[:16]}...)"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _hub_online() -> Iterator[None]:
    """Lift the library's ``HF_HUB_OFFLINE`` for one download (huggingface_hub reads it into its constants at import
    time, so both the variable and the constant are switched, and restored afterwards)."""
    from huggingface_hub import constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved = constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "0"
    os.environ["TRANSFORMERS_OFFLINE"] = "0"
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _no_network(entry: CatalogEntry, dest: Path, err: BaseException) -> CytologiaInputError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CytologiaInputError(
        f"cannot download {entry.name} from {entry.url} ({reason[:200]}): without network, download it elsewhere, "
        f"place it as {dest} and run `cytologia weights pull {entry.name} --from-file {dest}`"
    )


def _download_url(entry: CatalogEntry, tmp: Path, timeout: float) -> None:
    """A plain download (``urllib``: honours ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``) into ``tmp``."""
    request = urllib.request.Request(entry.source, headers={"User-Agent": "cytologia-weights-pull"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:  # noqa: S310
        shutil.copyfileobj(response, out, 1 << 20)


def _probe(url: str, timeout: float) -> None:
    """One HEAD request (through the proxy variables, no retry): raises when the server cannot be reached at all. An
    HTTP error status means the network works (huggingface_hub then says what is wrong). huggingface_hub itself
    retries with backoff for about a minute when no server answers; this makes "no network" fail in seconds."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "cytologia-weights-pull"})
    try:
        urllib.request.urlopen(request, timeout=timeout).close()  # noqa: S310
    except urllib.error.HTTPError:
        pass


def _hub_cache_dir() -> str | None:
    """huggingface_hub's cache folder as the environment says now (``HF_HUB_CACHE``, else ``HF_HOME``/hub): the
    library reads both once, when it is first imported, which may be before the caller set them."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None


def _download_hf(entry: CatalogEntry, tmp: Path, timeout: float) -> None:
    """A file of a Hugging Face repository through huggingface_hub (its cache under ``HF_HOME``), copied to
    ``tmp``. ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_CACHE`` are read now, not at huggingface_hub's import."""
    from huggingface_hub import hf_hub_download

    _probe(entry.url, timeout)
    with _hub_online():
        cached = hf_hub_download(
            entry.source,
            entry.hf_file,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            cache_dir=_hub_cache_dir(),
            etag_timeout=timeout,
        )
    shutil.copyfile(cached, tmp)


def _expected_sha(entry: CatalogEntry, manifest: dict[str, dict[str, Any]]) -> tuple[str | None, str]:
    """The pinned sha256 of ``entry`` (catalog first, else the manifest's from an earlier pull) and where it is from."""
    if entry.sha256:
        return entry.sha256, "the catalog"
    recorded = manifest.get(entry.file, {}).get("sha256")
    return (recorded, MANIFEST_NAME) if recorded else (None, "")


def pull(
    names: Sequence[str],
    models_dir: str | Path | None = None,
    *,
    from_file: str | Path | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
    force: bool = False,
) -> list[PullResult]:
    """Download the catalog entries ``names`` into ``models_dir`` and record them in its manifest (sha256, size,
    source, licence). A file already present and matching the manifest is kept (``force`` downloads again).
    ``from_file``: take the bytes from that local file instead of the network (one name only). A file whose sha256
    differs from the pinned one is refused and nothing is written."""
    directory = Path(models_dir) if models_dir is not None else _default_models_dir()
    directory.mkdir(parents=True, exist_ok=True)
    entries = [catalog_entry(n) for n in dict.fromkeys(names)]
    if from_file is not None and len(entries) != 1:
        raise CytologiaInputError("--from-file takes exactly one catalog name")
    results = []
    for entry in entries:
        dest = directory / entry.file
        manifest = read_manifest(directory)
        expected, pinned_by = _expected_sha(entry, manifest)
        if dest.is_file() and not force and from_file is None and entry.file in manifest:
            path = verified_path(dest, directory)
            if expected is not None and manifest[entry.file]["sha256"] != expected:
                raise CytologiaInputError(f"{dest}: manifest sha256 differs from {pinned_by}'s {expected}")
            results.append(_result(entry, path, manifest[entry.file], "present"))
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.file}.", suffix=".part", dir=directory)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if from_file is not None:
                if not Path(from_file).is_file():
                    raise CytologiaInputError(f"--from-file {from_file}: no such file")
                shutil.copyfile(from_file, tmp)
                status = "from-file"
            else:
                log.info("pulling %s from %s", entry.name, entry.url)
                try:
                    (_download_hf if entry.route == "hf" else _download_url)(entry, tmp, timeout)
                except CytologiaInputError:
                    raise
                except Exception as err:  # no network, DNS, proxy, HTTP and hub errors all end here
                    raise _no_network(entry, dest, err) from None
                status = "downloaded"
            actual = _sha256(tmp)
            if expected is not None and actual != expected:
                raise CytologiaInputError(
                    f"{entry.name}: the file from {from_file or entry.url} has sha256 {actual}, {pinned_by} pins "
                    f"{expected}: refused, nothing written"
                )
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        record = add_to_manifest(
            dest, entry.url, directory, catalog_name=entry.name, licence=entry.licence, pinned=expected is not None
        )
        results.append(_result(entry, dest, record, status))
    return results


def _result(entry: CatalogEntry, path: Path, record: dict[str, Any], status: str) -> PullResult:
    return PullResult(
        entry.name, path, record["sha256"], int(record["size"]), record.get("source", ""), entry.licence, status
    )


# ------------------------------------------------------------------------------------------------ the listing
def weight_status(name: str, models_dir: str | Path | None = None) -> dict[str, Any]:
    """Where catalog entry ``name`` stands in ``models_dir``: ``present`` (file there and in the manifest; hashes are
    checked by ``cytologia weights check`` and by every load), ``unregistered`` (file there, not in the manifest) or
    ``missing``; with the command that gets it."""
    entry = catalog_entry(name)
    directory = Path(models_dir) if models_dir is not None else _default_models_dir()
    path = directory / entry.file
    listed = entry.file in read_manifest(directory)
    state = "missing" if not path.is_file() else ("present" if listed else "unregistered")
    fix = {
        "missing": pull_command([name]),
        "unregistered": f"cytologia weights pull {name} --from-file {path}",
        "present": "",
    }[state]
    return {**asdict(entry), "url": entry.url, "path": str(path), "state": state, "command": fix}
