"""`cytologia weights pull`: downloads from a hub served on 127.0.0.1 by the test (plain URL and Hugging Face routes),
sha256 pinning, the offline failure, `--from-file`, `list`, and a config that names pulled weights training a step.

No test touches the outside network: every catalog entry used here points at the local server (or at a closed port).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cytologia.cli import main
from cytologia.errors import CytologiaInputError
from cytologia.weights import read_manifest
from cytologia.weights_catalog import CATALOG, CatalogEntry, pull, resolve_weights, weight_status

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the revision the emulated hub reports


class _Hub(BaseHTTPRequestHandler):
    """``/files/<name>`` (a release URL) and ``/<org>/<repo>/resolve/main/<file>`` (the route huggingface_hub reads:
    HEAD for the metadata -- commit, ETag, size -- then GET)."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def _send(self, body: bool) -> None:
        self.requests.append(f"{self.command} {self.path}")
        data = self.files.get(self.path.split("?")[0])
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(False)

    def do_GET(self) -> None:  # noqa: N802
        self._send(True)

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A hub on 127.0.0.1 in a thread; ``HF_ENDPOINT`` points at it and ``HF_HOME`` is the test's."""
    _Hub.files, _Hub.requests = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield url
    server.shutdown()
    server.server_close()


def _tiny_resnet_file(path: Path) -> dict[str, torch.Tensor]:
    """timm-format weights of resnet10t with a 1000-class head, as a timm/<tag> repository holds them."""
    import timm

    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet10t", num_classes=1000).state_dict().items()}
    save_file(state, str(path))
    return state


def _entry(name: str, route: str, source: str, sha: str | None = None, file: str | None = None) -> CatalogEntry:
    return CatalogEntry(name, file or f"{name}.bin", route, source, "test-licence", "resnet10t", sha)


def test_pull_by_url_records_the_manifest_and_keeps_a_present_file(
    hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"weights " * 1000
    _Hub.files["/files/net.pt"] = payload
    monkeypatch.setitem(CATALOG, "test_net", _entry("test_net", "url", f"{hub}/files/net.pt", file="net.pt"))
    models = tmp_path / "models"
    (result,) = pull(["test_net"], models)
    assert result.status == "downloaded" and (models / "net.pt").read_bytes() == payload
    entry = read_manifest(models)["net.pt"]
    assert entry["sha256"] == hashlib.sha256(payload).hexdigest() and entry["size"] == len(payload)
    assert entry["source"] == f"{hub}/files/net.pt" and entry["licence"] == "test-licence"
    assert entry["catalog_name"] == "test_net" and entry["pinned"] is False  # recorded on first pull
    n = len(_Hub.requests)
    (again,) = pull(["test_net"], models)
    assert again.status == "present" and len(_Hub.requests) == n  # no second download
    assert resolve_weights("test_net", models) == models / "net.pt"
    assert not list(models.glob("*.part"))


def test_a_file_whose_sha256_differs_from_the_pin_is_refused(
    hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = b"the published bytes", b"something else entirely"
    _Hub.files["/files/a.pt"] = bad
    pinned = _entry("test_pinned", "url", f"{hub}/files/a.pt", hashlib.sha256(good).hexdigest(), "a.pt")
    monkeypatch.setitem(CATALOG, "test_pinned", pinned)
    models = tmp_path / "models"
    with pytest.raises(CytologiaInputError, match="refused"):
        pull(["test_pinned"], models)
    assert not (models / "a.pt").exists() and "a.pt" not in read_manifest(models)
    assert not list(models.glob("*.part"))
    _Hub.files["/files/a.pt"] = good
    assert pull(["test_pinned"], models)[0].status == "downloaded"
    assert read_manifest(models)["a.pt"]["pinned"] is True
    # an unpinned entry is pinned by its first pull: a later pull of other bytes is refused
    monkeypatch.setitem(CATALOG, "test_first", _entry("test_first", "url", f"{hub}/files/b.pt", None, "b.pt"))
    _Hub.files["/files/b.pt"] = good
    pull(["test_first"], models)
    _Hub.files["/files/b.pt"] = bad
    with pytest.raises(CytologiaInputError, match="manifest.json pins"):
        pull(["test_first"], models, force=True)
    assert (models / "b.pt").read_bytes() == good


def test_pull_through_huggingface_hub_honours_hf_endpoint_and_lifts_offline_only_for_itself(
    hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    state = _tiny_resnet_file(tmp_path / "model.safetensors")
    _Hub.files["/timm/resnet10t.test_tag/resolve/main/model.safetensors"] = (
        tmp_path / "model.safetensors"
    ).read_bytes()
    tag = "resnet10t.test_tag"
    monkeypatch.setitem(CATALOG, tag, _entry(tag, "hf", f"timm/{tag}", file=f"{tag}.safetensors"))
    # The library's offline default (cytologia.offline), set here explicitly: another test of the session may have
    # imported huggingface_hub under other variables, and its constants are read once, at import.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models = tmp_path / "models"
    (result,) = pull([tag], models)
    assert result.status == "downloaded" and result.source == f"{hub}/timm/{tag}/resolve/main/model.safetensors"
    assert any(r.startswith("GET /timm/resnet10t.test_tag/resolve/main/") for r in _Hub.requests)
    assert constants.HF_HUB_OFFLINE  # restored after the download
    assert list((tmp_path / "hf_home").rglob("model.safetensors"))  # through huggingface_hub's cache in HF_HOME
    from safetensors.torch import load_file

    got = load_file(str(models / f"{tag}.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_a_config_naming_pulled_weights_loads_them_and_trains_a_step(
    hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cytologia.classification.models import create_classifier
    from cytologia.recipes import check_weights, compose_experiment

    state = _tiny_resnet_file(tmp_path / "model.safetensors")
    _Hub.files["/timm/resnet10t.test_tag/resolve/main/model.safetensors"] = (
        tmp_path / "model.safetensors"
    ).read_bytes()
    tag = "resnet10t.test_tag"
    monkeypatch.setitem(CATALOG, tag, _entry(tag, "hf", f"timm/{tag}", file=f"{tag}.safetensors"))
    models = tmp_path / "models"
    overrides = ["classifier.name=resnet10t", f"classifier.weights={tag}", f"paths.models_dir={models}"]
    cfg = compose_experiment("smoke", overrides)
    with pytest.raises(CytologiaInputError, match=f"cytologia weights pull {tag}"):
        check_weights(cfg)  # before the pull: the run would stop here, naming the command
    assert main(["weights", "pull", tag, "--models", str(models)]) == 0
    check_weights(cfg)
    with caplog.at_level(logging.INFO, logger="cytologia.classification.models"):
        model = create_classifier(
            cfg.classifier.name, 23, img_size=32, weights=cfg.classifier.weights, models_dir=cfg.paths.models_dir
        )
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert own["fc.weight"].shape == (23, 512)  # a new 23-class head
    assert "newly initialised: fc.weight, fc.bias" in caplog.text and "tensors loaded from" in caplog.text
    before = own["fc.weight"].clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 5]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(model.state_dict()["fc.weight"], before)


def test_without_network_pull_fails_at_once_naming_the_url_and_the_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused, as on an air-gapped machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/files/x.pt"
    monkeypatch.setitem(CATALOG, "test_offline", _entry("test_offline", "url", url, file="x.pt"))
    monkeypatch.setitem(CATALOG, "test_offline_hf", _entry("test_offline_hf", "hf", "timm/x", file="y.safetensors"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    models = tmp_path / "models"
    for name, file in (("test_offline", "x.pt"), ("test_offline_hf", "y.safetensors")):
        start = time.perf_counter()
        assert main(["weights", "pull", name, "--models", str(models), "--timeout", "2"]) == 2
        assert time.perf_counter() - start < 10  # no minute of retries
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and str(models / file) in err
        assert f"--from-file {models / file}" in err
    # the file placed by hand is taken with --from-file, hashed and registered
    (tmp_path / "x.pt").write_bytes(b"by hand")
    assert (
        main(["weights", "pull", "test_offline", "--models", str(models), "--from-file", str(tmp_path / "x.pt")]) == 0
    )
    assert read_manifest(models)["x.pt"]["sha256"] == hashlib.sha256(b"by hand").hexdigest()
    assert weight_status("test_offline", models)["state"] == "present"


def test_list_names_every_weight_the_three_recipes_need(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "list", "--json", "--models", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    first = data["recipes"]["first_place"]
    assert set(first["weights"]) == {
        "yolox_s",
        "vit_large_patch16_224.augreg_in21k_ft_in1k",
        "nextvit_large.bd_ssld_6m_in1k_384",
        "tf_efficientnetv2_m.in21k",
        "tiny_vit_21m_512.dist_in22k_ft_in1k",
        "dinobloom_b",
    }
    assert first["command"].startswith("cytologia weights pull yolox_s ")
    assert data["recipes"]["third_place"]["missing"] == ["yolo11m"]
    assert "yolo11l" in data["recipes"]["second_place"]["missing"]
    assert {s["state"] for s in data["catalog"].values()} == {"missing"}
    from cytologia.commands.weights import _print_listing

    _print_listing(data)  # the plain-text form of the same listing (composing every experiment again takes seconds)
    text = capsys.readouterr().out
    assert "first_place" in text and "0/6 present" in text and "cytologia weights pull yolox_s" in text
