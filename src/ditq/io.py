"""Safe output: check a destination before any work, build it beside, rename it into place.

The rules every command that writes follows (a user's files are never lost):

* :func:`check_output` runs before the work starts. A destination that does not exist (or
  is an empty directory) is fine. One that exists is replaced only with ``overwrite`` and
  only when it is recognizably an earlier output of the same kind (:class:`OutputKind`);
  anything else is an error naming the path and the fix. An output that would replace one
  of the command's inputs (or a directory holding one) is refused, and so is an output
  inside an input directory where the command reads the whole directory.
* :func:`atomic_path` builds the output under a hidden temporary name beside the
  destination and renames it into place when complete. Nothing the command did not
  create is deleted: a replaced directory is first renamed aside, then removed once the
  new one is in place.
* Files and directories get the permissions of the user's umask, like any other
  program's output (not the private modes of ``tempfile``).
* A run killed before its rename (SIGKILL) leaves its hidden temporary behind; the next
  write to the same destination removes the temporaries of processes that no longer run
  (and puts back a directory that was renamed aside but not yet replaced).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditq.errors import DitqError

TEMP_TAG, ASIDE_TAG = "ditq-tmp", "ditq-old"
"""Hidden names beside a destination ``D``: ``.D.ditq-tmp-PID-X`` while it is built,
``.D.ditq-old-PID-X`` for the output it replaces, until the new one is in place."""


@dataclass(frozen=True)
class OutputKind:
    """A kind of output: what it is called in messages, whether it is a directory, and how
    an earlier output of the kind is recognized (the only thing ``overwrite`` replaces)."""

    description: str
    directory: bool
    recognize: Callable[[Path], bool]


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None when the file is missing, unreadable, not JSON
    or not an object (what recognizing an earlier output needs)."""
    try:
        value = json.loads(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_safetensors(path: str | Path, fix: str, device: str = "cpu") -> dict:
    """Every tensor of a safetensors file; a damaged file is one :class:`DitqError` whose
    message ends with ``fix`` (:func:`unreadable_safetensors`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise unreadable_safetensors(path, err, fix) from err


def unreadable_safetensors(path: str | Path, err: Exception, fix: str) -> DitqError:
    return DitqError(f"{path} is not a readable safetensors file ({err}); {fix}")


def _is_zip_with(path: Path, member: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return member in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


SAMPLES_FILE = OutputKind("samples npz", False, lambda path: _is_zip_with(path, "arr_0.npy"))
"""``ditq sample --out``: the ADM layout (``arr_0`` images, ``arr_1`` labels)."""


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output(
    target: str | Path,
    kind: OutputKind,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    input_dirs: Iterable[str | Path] = (),
    flag: str = "--out",
) -> None:
    """Refuse, before any work, a destination this command may not write (module rules):
    ``inputs`` may not be the output or lie inside it; the output may not lie inside
    ``input_dirs`` either."""
    path = Path(target)
    resolved = path.resolve()
    if _inside(Path.cwd().resolve(), resolved):
        raise DitqError(
            f"{flag} {target} is the current directory or one above it; name a new "
            f"directory for the output, e.g. {flag} runs/out"
        )
    for source in inputs:
        source_path = Path(source).resolve()
        if source_path.exists() and _inside(source_path, resolved):
            raise DitqError(
                f"{flag} {target} would replace the input {source}; choose an output outside it"
            )
    for source in input_dirs:
        source_path = Path(source).resolve()
        if source_path.is_dir() and _inside(resolved, source_path):
            raise DitqError(
                f"{flag} {target} lies inside the input directory {source}; choose an output "
                f"outside it"
            )
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DitqError(f"{flag} {target}: {parent} is a file, not a directory")
            break
    if not path.exists() and not path.is_symlink():
        return
    if kind.directory:
        if not path.is_dir():
            raise DitqError(
                f"{flag} {target} exists and is a file, not a {kind.description}; choose "
                f"another {flag}"
            )
        if not any(path.iterdir()):
            return
    elif path.is_dir():
        raise DitqError(
            f"{flag} {target} is a directory; {flag} takes a file path (a "
            f"{kind.description}), e.g. {flag} {path / 'out'}"
        )
    if not kind.recognize(path):
        raise DitqError(
            f"{flag} {target} exists and is not a {kind.description}; choose another "
            f"{flag} (--overwrite replaces only a {kind.description})"
        )
    if not overwrite:
        raise DitqError(
            f"{flag} {target} already holds a {kind.description}; pass --overwrite to "
            f"replace it, or choose another {flag}"
        )


def _pid_of(name: str, prefix: str) -> int | None:
    try:
        return int(name[len(prefix) :].split("-", 1)[0])
    except ValueError:
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(target: str | Path) -> list[Path]:
    """Remove the temporaries left beside ``target`` by killed runs (their process no longer
    runs); an output renamed aside by a killed run goes back in place if nothing replaced it.
    Returns what was removed or restored."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    done = []
    for tag in (TEMP_TAG, ASIDE_TAG):
        prefix = f".{target.name}.{tag}-"
        for entry in sorted(target.parent.glob(f"{glob_escape(prefix)}*")):
            pid = _pid_of(entry.name, prefix)
            if pid is None or pid == os.getpid() or _running(pid):
                continue
            if tag == ASIDE_TAG and not target.exists():
                os.replace(entry, target)
            else:
                _remove(entry)
            done.append(entry)
    return done


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters escaped, for :meth:`Path.glob`."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def current_umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything in it) the modes a plain ``open`` or
    ``mkdir`` would have given: libraries writing through private temporary files (0600)
    must not leak their modes into the user's output."""
    mask = current_umask()
    entries = [path]
    if path.is_dir() and not path.is_symlink():
        entries += list(path.rglob("*"))
    for entry in entries:
        if entry.is_symlink():
            continue
        executable = entry.is_dir() or entry.stat().st_mode & 0o111
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)


def _hidden_name(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def atomic_path(target: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a new hidden path beside ``target`` (a file or an empty directory, with the
    umask's permissions); rename it onto ``target`` when the block completes.

    On any exception the temporary is removed and ``target`` is left as it was. An existing
    directory ``target`` is renamed aside, replaced, then removed: callers decide whether it
    may be replaced (:func:`check_output`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = _hidden_name(target, TEMP_TAG)
    if directory:
        os.mkdir(tmp, 0o777)
    else:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        apply_umask(tmp)
        if directory and (target.exists() or target.is_symlink()):
            aside = _hidden_name(target, ASIDE_TAG)
            os.replace(target, aside)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(aside, target)
                raise
            _remove(aside)
        else:
            os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            _remove(tmp)
        raise


@contextmanager
def write_output(
    target: str | Path, kind: OutputKind, *, overwrite: bool = False
) -> Iterator[Path]:
    """:func:`check_output` again (the destination may have changed while the command
    worked), then :func:`atomic_path`."""
    check_output(target, kind, overwrite=overwrite)
    with atomic_path(target, directory=kind.directory) as tmp:
        yield tmp


SAMPLES_META_KEY = "ditq_meta"
"""Optional npz entry of a samples file: a JSON object (as a 0-d string array) saying which
model made the samples (``method``: ``fp`` or the quantization method) and how."""


def save_samples_npz(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    meta: dict | None = None,
    overwrite: bool = False,
) -> None:
    """Samples in the ADM evaluator layout: ``arr_0`` uint8 NHWC, ``arr_1`` int labels, and
    ``meta`` (JSON) under :data:`SAMPLES_META_KEY`, which ADM's evaluator ignores."""
    extra = {} if meta is None else {SAMPLES_META_KEY: np.array(json.dumps(meta))}
    with write_output(path, SAMPLES_FILE, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        np.savez(f, images, labels, **extra)
