"""The deploy bundle (DESIGN.md §5): a self-describing folder, checked on load.

    bundle/manifest.json            format version, normalized config, dtype, graph I/O, files (size + sha256)
    bundle/decoder.onnx(.data)      the decoder graph and its external weights
    bundle/tokenizer.json, tokenizer_config.json, generation_config.json

Sizes are checked on every load; sha256 on request (`verify=True`) and on the first load after a
copy (a `.verified` stamp records each file's size and mtime after a full check; a copy changes
the mtimes, so the next load hashes again).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgecpm.config import ModelConfig
from edgecpm.errors import BundleError

FORMAT = "edgecpm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAMP = ".verified"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


@dataclass
class Bundle:
    path: Path
    manifest: dict
    config: ModelConfig

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def graph(self, name: str = "decoder") -> dict:
        return self.manifest["graphs"][name]

    def file(self, name: str) -> Path:
        return self.path / name


def is_bundle(path: Path) -> bool:
    return (Path(path) / MANIFEST).exists()


def manifest_path(path: str | Path) -> Path:
    """The manifest file of `path`: a bundle folder (-> folder/manifest.json) or a manifest file."""
    path = Path(path)
    return path if path.suffix == ".json" and not path.is_dir() else path / MANIFEST


def read_manifest(path: str | Path, check_format: bool = True) -> dict:
    """The manifest of a bundle folder (or of a manifest.json path) as a dict. The one reader of
    manifest.json: a missing file, invalid JSON, a non-object, and (with check_format) another
    format or a newer format version are BundleErrors naming the file."""
    mpath = manifest_path(path)
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError:
        folder = mpath.parent
        raise BundleError(f"{mpath}: not found; {folder} is not an exported bundle — export one with "
                          f"`edgecpm export CHECKPOINT -o {folder}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: cannot be read ({e}); re-export or re-copy the bundle") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: not valid JSON ({e}); re-export or re-copy the bundle") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: not an edgecpm bundle manifest (a JSON {type(manifest).__name__}, "
                          f"not an object); re-export the bundle")
    if check_format:
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not an edgecpm bundle manifest (format={manifest.get('format')!r})")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(
                f"{mpath}: bundle format version {version} is newer than this edgecpm reads ({FORMAT_VERSION}); "
                f"upgrade edgecpm on the device or export with a matching version"
            )
    return manifest


def write_manifest(path: str | Path, manifest: dict) -> Path:
    """Writes the manifest of a bundle folder (or to a manifest.json path) atomically: a temp file in
    the same folder, flushed to disk, then os.replace -- a reader sees the old or the new manifest,
    never half of one. The one writer of manifest.json. Returns the manifest's path."""
    mpath = manifest_path(path)
    data = json.dumps(manifest, indent=1).encode()
    tmp = mpath.with_name(f".{mpath.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, mpath)
    except OSError as e:
        raise BundleError(f"{mpath}: cannot be written ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return mpath


def load_bundle(path: str | Path, verify: bool = False) -> Bundle:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise BundleError(f"{path}: no {MANIFEST}; export a bundle with `edgecpm export CHECKPOINT -o {path}`")
    manifest = read_manifest(mpath)
    _check_files(path, manifest["files"], verify)
    return Bundle(path, manifest, ModelConfig.from_dict(manifest["config"], source=str(mpath)))


def _check_files(path: Path, files: dict, verify: bool) -> None:
    for name, rec in files.items():
        f = path / name
        if not f.exists():
            raise BundleError(f"{f}: missing from the bundle (listed in {MANIFEST}); re-copy the bundle")
        size = f.stat().st_size
        if size != rec["size"]:
            raise BundleError(f"{f}: size {size} bytes, manifest says {rec['size']}; the copy is truncated "
                              f"or the file was modified — re-copy the bundle")
    stamp = _stamp(path, files)
    stamp_file = path / STAMP
    if not verify and stamp_file.exists() and stamp_file.read_text() == stamp:
        return
    for name, rec in files.items():
        if sha256_file(path / name) != rec["sha256"]:
            raise BundleError(f"{path / name}: sha256 mismatch with {MANIFEST}; the file is corrupted — re-copy "
                              f"or re-export the bundle")
    try:
        stamp_file.write_text(stamp)
    except OSError:
        pass  # a read-only bundle is simply hashed on every load


def _stamp(path: Path, files: dict) -> str:
    stats = {n: [(path / n).stat().st_size, (path / n).stat().st_mtime_ns] for n in sorted(files)}
    return json.dumps(stats)
