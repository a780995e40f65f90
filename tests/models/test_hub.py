"""Official-name downloads, tested against a local HTTP server and faked transports."""

import hashlib
import http.server
import io
import threading
from functools import partial

import pytest
import torch

from ditq import load_model
from ditq.errors import DitqError
from ditq.models import hub

from conftest import tiny_dit


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Serve tmp_path/www on 127.0.0.1; downloads go to tmp_path/cache."""
    www = tmp_path / "www"
    www.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DITQ_CACHE", str(tmp_path / "cache"))
    yield www, f"http://127.0.0.1:{server.server_port}", requests
    server.shutdown()
    server.server_close()


def _register(monkeypatch, url, sha256=None):
    entry = hub.OfficialCheckpoint(
        url=url, filename="tiny.pt", arch=None, input_size=None, sha256=sha256
    )
    monkeypatch.setitem(hub.OFFICIAL_CHECKPOINTS, "DiT-tiny", entry)


def test_official_names_point_at_the_official_addresses():
    assert hub.OFFICIAL_CHECKPOINTS["DiT-XL-2-256"].url == (
        "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    )
    assert hub.OFFICIAL_CHECKPOINTS["DiT-XL-2-512"].input_size == 64


def test_download_cache_and_load_by_name(served, tmp_path, monkeypatch):
    www, base, requests = served
    model = tiny_dit()
    torch.save(model.state_dict(), www / "tiny.pt")
    _register(monkeypatch, f"{base}/tiny.pt")
    loaded = load_model("DiT-tiny", num_heads=2, progress=False)
    torch.testing.assert_close(loaded(*_inputs()), model(*_inputs()))
    cached = tmp_path / "cache" / "tiny.pt"
    assert cached.read_bytes() == (www / "tiny.pt").read_bytes()
    assert (tmp_path / "cache" / "tiny.pt.sha256").read_text().strip() == _sha(cached)
    load_model("DiT-tiny", num_heads=2, progress=False)
    assert requests == ["/tiny.pt"], "the second load must come from the cache"
    # A corrupted cache entry fails its recorded hash and is fetched again.
    cached.write_bytes(cached.read_bytes()[:-10])
    load_model("DiT-tiny", num_heads=2, progress=False)
    assert requests == ["/tiny.pt", "/tiny.pt"]
    assert _sha(cached) == _sha(www / "tiny.pt")
    assert not list((tmp_path / "cache").glob("*.part"))


def test_pinned_hash_mismatch_keeps_nothing(served, tmp_path, monkeypatch):
    www, base, _ = served
    (www / "tiny.pt").write_bytes(b"some bytes")
    _register(monkeypatch, f"{base}/tiny.pt", sha256="0" * 64)
    with pytest.raises(DitqError, match="expected 0000"):
        hub.fetch_official("DiT-tiny", progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_missing_file_and_no_network_are_clear_errors(served, tmp_path, monkeypatch):
    _, base, _ = served
    _register(monkeypatch, f"{base}/absent.pt")
    with pytest.raises(DitqError, match="could not download .*absent.pt"):
        hub.fetch_official("DiT-tiny", progress=False)

    def offline(url):
        raise OSError("Temporary failure in name resolution")

    with pytest.raises(DitqError, match="pass its path to --model"):
        hub.fetch_official("DiT-tiny", opener=offline, progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_truncated_transfer_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("DITQ_CACHE", str(tmp_path / "cache"))
    _register(monkeypatch, "https://example.invalid/tiny.pt")

    class ShortResponse(io.BytesIO):
        headers = {"Content-Length": "100"}

    with pytest.raises(DitqError, match="cut short \\(10 of 100 bytes\\)"):
        hub.fetch_official("DiT-tiny", opener=lambda url: ShortResponse(b"x" * 10), progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_unknown_name():
    with pytest.raises(DitqError, match="official names are DiT-XL-2-256, DiT-XL-2-512"):
        hub.fetch_official("DiT-XL-2-1024")


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 3, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 4])


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()
