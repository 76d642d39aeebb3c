"""Files acip writes: atomic replacement, and a sha256 for every tensor, checked when read.

Every safetensors file acip writes itself carries, in its header metadata under
``acip_digests``, the sha256 of each tensor's raw bytes (exactly the bytes of the file's data
section, so any dtype works). :func:`read_tensors` reads the file **once**, checks every digest
and only then builds tensors; a mismatch raises :class:`ChecksumError` naming the file and the
tensor. Directories written by ``save_pretrained`` (exports) get a manifest instead
(:func:`write_manifest` / :func:`verify_manifest`): the same digests per file, plus a digest of
the config's ``acip_layout``.

Atomicity: :func:`atomic_write` writes a temporary sibling file and renames it onto the target;
:func:`atomic_dir` builds a whole directory as a temporary sibling and swaps it into place
(``renameat2(RENAME_EXCHANGE)`` where the kernel has it), so a reader sees the old artifact or the
new one, never a mix, and a SIGKILL leaves the old one intact.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

__all__ = [
    "ArtifactError", "ChecksumError", "atomic_write", "atomic_dir", "tensor_digest", "save_tensors",
    "read_tensors", "file_digests", "write_manifest", "verify_manifest", "MANIFEST_FILE", "DIGESTS_KEY",
]

DIGESTS_KEY = "acip_digests"
META_DIGEST = "__metadata__"  # key of the metadata's own digest inside the digest table
MANIFEST_FILE = "acip_manifest.json"
MANIFEST_FORMAT = "acip.manifest/1"
_STALE_S = 3600.0  # temporary siblings older than this are leftovers of a killed writer


class ArtifactError(ValueError):
    """A file acip wrote is missing parts, truncated, or not what it claims to be."""


class ChecksumError(ArtifactError):
    """Stored bytes do not match their sha256: the file was corrupted or edited.

    ``file`` and ``tensor`` name what failed the check.
    """

    def __init__(self, message: str, file: str | None = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.file, self.tensor = file, tensor


# ---------------------------------------------------------------------------------------- atomic
def _clean_stale(parent: Path, prefix: str) -> None:
    """Remove temporary siblings ``prefix*`` left behind by a writer that was killed."""
    now = time.time()
    for p in parent.glob(prefix + "*"):
        try:
            if now - p.stat().st_mtime > _STALE_S:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            pass


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)``, then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    _clean_stale(path.parent, prefix)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it into place when the block succeeds.

    ``with atomic_dir(out) as tmp: ...write files into tmp...``. An existing ``out`` is replaced
    as a whole (its files are not merged); if the block raises (or the process is killed) the old
    directory is untouched and the temporary one is removed (or cleaned by a later writer).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} exists and is not a directory; pass a directory path")
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    _clean_stale(path.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if path.exists():
            if _exchange(tmp, path):  # tmp now holds the old directory
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------- digests
def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (C-contiguous, CPU), as safetensors stores them."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _parse(data: bytes, path: str) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file's bytes; ArtifactError when malformed."""
    if len(data) < 8:
        raise ArtifactError(f"{path!r} is truncated ({len(data)} bytes): not a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ArtifactError(f"{path!r} is truncated or not a safetensors file (header of {n} bytes, file {len(data)})")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path!r} has a damaged safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path!r} has a damaged safetensors header (not a JSON object)")
    start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ArtifactError(f"{path!r}: tensor {name!r} has a damaged header entry") from None
        if not (0 <= b <= e and start + e <= len(data)):
            raise ArtifactError(f"{path!r} is truncated: tensor {name!r} lies past the end of the file")
    return header, start


def _digests_of(data: bytes, header: dict, start: int) -> dict[str, str]:
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = hashlib.sha256(memoryview(data)[start + b:start + e]).hexdigest()
    return out


def _meta_digest(meta: Mapping[str, str]) -> str:
    """sha256 of the header metadata (every key but the digest table), so edited fields fail too."""
    items = {k: v for k, v in meta.items() if k != DIGESTS_KEY}
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {str(path)!r}")
    return path.read_bytes()


def file_digests(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every tensor's bytes in any safetensors file."""
    path = Path(path)
    data = _read_bytes(path, "safetensors file")
    header, start = _parse(data, str(path))
    return _digests_of(data, header, start)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` atomically as safetensors, with their sha256 in the header metadata."""
    from safetensors.torch import save_file

    ts = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if DIGESTS_KEY in meta or META_DIGEST in ts:
        raise ValueError(f"{DIGESTS_KEY!r} / {META_DIGEST!r} are reserved names in acip files")
    digests = {n: tensor_digest(t) for n, t in ts.items()}
    digests[META_DIGEST] = _meta_digest(meta)
    meta[DIGESTS_KEY] = json.dumps(digests, sort_keys=True)
    return atomic_write(path, lambda tmp: save_file(ts, tmp, metadata=meta))


def read_tensors(path: str | os.PathLike, verify: bool = True, what: str = "acip file",
                 require_digests: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by :func:`save_tensors` in one read: ``(tensors, metadata)``.

    Every tensor's sha256 is checked against the header (``verify=False`` skips it). A file
    without digests is refused when ``require_digests`` (it was not written by this acip).
    """
    from safetensors.torch import load as load_bytes

    path = Path(path)
    data = _read_bytes(path, what)
    header, start = _parse(data, str(path))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ArtifactError(f"{str(path)!r} has damaged metadata in its header")
    if verify:
        want_raw = meta.get(DIGESTS_KEY)
        if want_raw is None:
            if require_digests:
                raise ArtifactError(f"{str(path)!r} carries no tensor digests ({DIGESTS_KEY}); it was not written by "
                                    f"this version of acip, or its header was replaced")
        else:
            try:
                want = json.loads(want_raw)
            except json.JSONDecodeError:
                raise ChecksumError(f"{str(path)!r}: the digest table in the header is damaged", str(path)) from None
            got = _digests_of(data, header, start)
            if want.pop(META_DIGEST, None) != _meta_digest(meta):
                raise ChecksumError(f"{str(path)!r}: the header metadata was edited or corrupted (its sha256 does not "
                                    f"match). Restore the file from a copy or re-create it.", str(path), "__metadata__")
            if set(want) != set(got):
                extra, gone = sorted(set(got) - set(want)), sorted(set(want) - set(got))
                raise ChecksumError(f"{str(path)!r}: tensors {extra or gone} are "
                                    f"{'not in the digest table' if extra else 'missing'}; the file was edited",
                                    str(path), (extra or gone)[0])
            for name, d in got.items():
                if d != want[name]:
                    raise ChecksumError(f"{str(path)!r}: tensor {name!r} does not match its sha256: the file is "
                                        f"corrupted. Restore it from a copy or re-create it.", str(path), name)
    try:
        tensors = load_bytes(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ArtifactError(f"{str(path)!r} is truncated or corrupted ({e})") from None
    return tensors, {k: v for k, v in meta.items() if k != DIGESTS_KEY}


# ---------------------------------------------------------------------------------------- manifests
def _layout_digest(config: Mapping[str, Any] | None) -> str:
    layout = (config or {}).get("acip_layout")
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: str | os.PathLike) -> Path:
    """Digest every ``*.safetensors`` in ``directory`` (and its config's ``acip_layout``)."""
    d = Path(directory)
    files = {p.name: file_digests(p) for p in sorted(d.glob("*.safetensors"))}
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else None
    manifest = {"format": MANIFEST_FORMAT, "files": files, "layout_sha256": _layout_digest(cfg)}
    return atomic_write(d / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))


def verify_manifest(directory: str | os.PathLike, required: bool = True) -> bool:
    """Check every file and tensor listed in the manifest, and the layout digest.

    Returns False (nothing checked) when there is no manifest and ``required`` is False.
    """
    d = Path(directory)
    mf = d / MANIFEST_FILE
    if not mf.is_file():
        if required:
            raise ArtifactError(f"{str(d)!r} has no {MANIFEST_FILE}: it cannot be verified. Re-save it with "
                                f"save_pretrained after `import acip`, or load with verify=False")
        return False
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ChecksumError(f"{str(mf)!r} is damaged", str(mf)) from None
    present = {p.name for p in d.glob("*.safetensors")}
    if present - set(files):
        raise ChecksumError(f"{str(d)!r}: weight files {sorted(present - set(files))} are not in the manifest",
                            str(d / sorted(present - set(files))[0]))
    for fname, want in files.items():
        path = d / fname
        if not path.is_file():
            raise ChecksumError(f"{str(path)!r} is listed in the manifest but missing", str(path))
        got = file_digests(path)
        for name in sorted(set(want) | set(got)):
            if want.get(name) != got.get(name):
                state = "missing" if name not in got else ("unexpected" if name not in want else "corrupted")
                raise ChecksumError(f"{str(path)!r}: tensor {name!r} is {state} (sha256 check failed). Restore the "
                                    f"file from a copy or export again.", str(path), name)
    if (d / "config.json").is_file():
        cfg = json.loads((d / "config.json").read_text())
        if manifest.get("layout_sha256") != _layout_digest(cfg):
            raise ChecksumError(f"{str(d / 'config.json')!r}: acip_layout was edited after saving (its sha256 does "
                                f"not match the manifest); export again", str(d / "config.json"), "acip_layout")
    return True
