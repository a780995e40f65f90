"""Official DiT checkpoints: names, download addresses, a local cache and integrity checks.

Files are downloaded to ``$DITQ_CACHE`` (default ``~/.cache/ditq``) through a temporary
file that is renamed only once complete, so an interrupted download never leaves a file
that looks valid. Integrity: the byte count must match the server's ``Content-Length``;
the SHA-256 of the file is checked against the pinned value where the table has one, and
otherwise recorded beside the file (``NAME.sha256``) at download time and checked on every
later use, so a truncated or corrupted cache entry is detected and re-downloaded.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from ditq.errors import DitqError


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One published DiT checkpoint and the architecture it needs."""

    url: str
    filename: str
    arch: str | None
    input_size: int | None
    in_channels: int = 4
    num_classes: int = 1000
    sha256: str | None = None


OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    "DiT-XL-2-256": OfficialCheckpoint(
        url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
        filename="DiT-XL-2-256x256.pt",
        arch="DiT-XL/2",
        input_size=32,
    ),
    "DiT-XL-2-512": OfficialCheckpoint(
        url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
        filename="DiT-XL-2-512x512.pt",
        arch="DiT-XL/2",
        input_size=64,
    ),
}

Opener = Callable[[str], BinaryIO]
"""Opens a URL for reading; the response may carry ``headers`` with ``Content-Length``."""


def cache_dir() -> Path:
    """Where downloads are kept: ``$DITQ_CACHE`` or ``~/.cache/ditq``."""
    return Path(os.environ.get("DITQ_CACHE", Path.home() / ".cache" / "ditq"))


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _default_opener(url: str) -> BinaryIO:
    return urllib.request.urlopen(url, timeout=60)  # noqa: S310 (https address from our table)


def download(
    url: str,
    dest: Path,
    expected_sha256: str | None = None,
    opener: Opener | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` atomically and verify size and hash; returns ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    received = 0
    try:
        with (opener or _default_opener)(url) as response:
            headers = getattr(response, "headers", None)
            length = headers.get("Content-Length") if headers is not None else None
            total = int(length) if length else None
            with (
                open(tmp, "wb") as out,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=dest.name,
                    disable=not progress,
                ) as bar,
            ):
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DitqError(
            f"could not download {url}: {err}. Check the network, or download the file "
            f"yourself and pass its path to --model"
        ) from err
    if total is not None and received != total:
        tmp.unlink(missing_ok=True)
        raise DitqError(f"download of {url} was cut short ({received} of {total} bytes); run again")
    actual = digest.hexdigest()
    if expected_sha256 is not None and actual != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise DitqError(
            f"{url} has SHA-256 {actual}, expected {expected_sha256}: the download is corrupt "
            f"or the file changed upstream; nothing was kept"
        )
    os.replace(tmp, dest)
    _hash_record(dest).write_text(actual + "\n")
    return dest


def _hash_record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _cached_file_is_intact(path: Path, expected_sha256: str | None) -> bool:
    if not path.is_file():
        return False
    record = _hash_record(path)
    expected = expected_sha256 or (record.read_text().strip() if record.is_file() else None)
    return expected is not None and sha256_of(path) == expected


def fetch_official(name: str, opener: Opener | None = None, progress: bool = True) -> Path:
    """Local path of the official checkpoint ``name``, downloading it on first use."""
    if name not in OFFICIAL_CHECKPOINTS:
        raise DitqError(
            f"unknown checkpoint name {name!r}; official names are "
            f"{', '.join(OFFICIAL_CHECKPOINTS)}, or pass a file path"
        )
    entry = OFFICIAL_CHECKPOINTS[name]
    path = cache_dir() / entry.filename
    if _cached_file_is_intact(path, entry.sha256):
        return path
    return download(entry.url, path, entry.sha256, opener=opener, progress=progress)
