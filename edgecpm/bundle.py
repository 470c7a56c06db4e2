"""The deploy bundle (DESIGN.md §5): a self-describing folder, checked on load.

    bundle/manifest.json            format version, normalized config, dtype, graph I/O, files (size + sha256)
    bundle/decoder.onnx(.data)      the decoder graph and its external weights
    bundle/tokenizer.json, tokenizer_config.json, generation_config.json

Sizes are checked on every load; sha256 on request (`verify=True`) and on the first load after a
copy (a `.verified` stamp records each file's size and mtime, and the manifest's file records, after
a full check; a copy changes the mtimes, an edited manifest its records, so the next load hashes
again). A change that keeps size and mtime (bit rot, `cp -a` of a damaged file) is caught only by a
full re-hash: `load_bundle(path, verify=True)`, `Session(path, verify=True)` or `edgecpm verify`
(`verify_bundle`, which reports every bad file).

The manifest itself is checked before any file is opened (check_manifest): its required keys, a
size and sha256 for every file the bundle uses (each graph and its external data, the tokenizer
files, an FR-Spec table, each engine), and graph I/O that matches the model config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from edgecpm import dtypes
from edgecpm.config import ModelConfig
from edgecpm.errors import BundleError

FORMAT = "edgecpm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAMP = ".verified"
REQUIRED_KEYS = ("dtype", "config", "graphs", "files")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path, chunk: int = 1 << 22, on_chunk=None) -> str:
    """Hex sha256 of a file, read in chunks; on_chunk(n_bytes) is called after each (progress)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_chunk is not None:
                on_chunk(len(block))
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
    try:
        atomic_write_bytes(mpath, json.dumps(manifest, indent=1).encode())
    except OSError as e:
        raise BundleError(f"{mpath}: cannot be written ({e})") from None
    return mpath


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a temp file beside `path`, flush it to disk, then os.replace: a reader sees the old or
    the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_bundle(path: str | Path, verify: bool = False) -> Bundle:
    """The bundle at `path`, checked: its manifest (check_manifest), every file's size, and the
    sha256 of every file when `verify` (always re-hashed, whatever the `.verified` stamp says) or
    when the stamp does not match (first load after a copy, an edited manifest)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise BundleError(f"{path}: no {MANIFEST}; export a bundle with `edgecpm export CHECKPOINT -o {path}`")
    manifest = read_manifest(mpath)
    config = check_manifest(manifest, mpath)
    _check_files(path, manifest["files"], verify)
    return Bundle(path, manifest, config)


# ---- the manifest's own consistency ------------------------------------------------------------
def _fail(mpath: Path, what: str) -> BundleError:
    return BundleError(f"{mpath}: {what}; the manifest is damaged or was edited — re-export the bundle "
                       f"(or re-copy it whole)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_name(mpath: Path, where: str, name) -> str:
    """A file name inside the bundle: a relative path (with /) that stays in the folder."""
    inside = isinstance(name, str) and name and "\\" not in name and not PurePosixPath(name).is_absolute() \
        and ".." not in PurePosixPath(name).parts
    if not inside:
        raise _fail(mpath, f"{where} must name a file inside the bundle, got {_short(name)}")
    return name


def _section(mpath: Path, manifest: dict, key: str) -> dict:
    """An optional object of the manifest ({} when absent or null)."""
    value = manifest.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(mpath, f'"{key}" must be an object (or null), got {_short(value)}')
    return value


def _check_record(mpath: Path, where: str, rec) -> None:
    if not isinstance(rec, dict):
        raise _fail(mpath, f"{where} must be an object with size and sha256, got {_short(rec)}")
    if not _is_int(rec.get("size")) or rec["size"] < 0:
        raise _fail(mpath, f"{where} has no valid size (bytes), got {_short(rec.get('size'))}")
    if not isinstance(rec.get("sha256"), str) or not _SHA256.fullmatch(rec["sha256"]):
        raise _fail(mpath, f"{where} has no valid sha256 (64 lowercase hex digits), got {_short(rec.get('sha256'))}")


def check_manifest(manifest: dict, mpath: Path) -> ModelConfig:
    """The model config of a manifest, after checking (BundleError naming `mpath` and the entry):
    the required keys; a size and sha256 record in "files" for every file the bundle uses (each
    graph's file and its `.data` external weights, the tokenizer files, an FR-Spec table) and in
    each "engines" entry; each graph's inputs/outputs; and that the decoder's I/O matches the
    config (layers, kv heads x head_dim, sparse compressed keys, logit columns)."""
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise _fail(mpath, f"required key(s) {', '.join(repr(k) for k in missing)} missing")
    if manifest["dtype"] not in dtypes.NAMES:
        raise _fail(mpath, f'"dtype" must be one of {", ".join(dtypes.NAMES)}, got {_short(manifest["dtype"])}')
    for key in ("config", "graphs", "files"):
        if not isinstance(manifest[key], dict):
            raise _fail(mpath, f'"{key}" must be an object, got {type(manifest[key]).__name__}')
    files = manifest["files"]
    for name, rec in files.items():
        _check_name(mpath, f'"files" entry {name!r}', name)
        _check_record(mpath, f'"files" entry {name!r}', rec)

    needed: dict[str, str] = {}  # file -> what uses it
    if "decoder" not in manifest["graphs"]:
        raise _fail(mpath, '"graphs" has no "decoder" entry')
    for gname, graph in manifest["graphs"].items():
        where = f'graph "{gname}"'
        if not isinstance(graph, dict):
            raise _fail(mpath, f"{where} must be an object")
        gfile = _check_name(mpath, f'{where} "file"', graph.get("file"))
        needed[gfile] = f"{where}'s file"
        needed[gfile + ".data"] = f"{where}'s external weights"
        for side in ("inputs", "outputs"):
            io = graph.get(side)
            if not isinstance(io, list) or not all(
                    isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("dtype"), str)
                    and isinstance(d.get("shape"), list) for d in io):
                raise _fail(mpath, f'{where} "{side}" must be a list of {{"name", "dtype", "shape"}} objects')
    tok_files = _section(mpath, manifest, "tokenizer").get("files") or []
    if not isinstance(tok_files, list):
        raise _fail(mpath, f'"tokenizer.files" must be a list of file names, got {_short(tok_files)}')
    for name in tok_files:
        needed[_check_name(mpath, '"tokenizer.files" entry', name)] = "a tokenizer file"
    frspec = _section(mpath, manifest, "spec").get("frspec")
    if frspec is not None:
        if not isinstance(frspec, dict) or not _is_int(frspec.get("r")) or frspec["r"] < 1:
            raise _fail(mpath, f'"spec.frspec" must be an object with "file" and a positive "r", got {_short(frspec)}')
        needed[_check_name(mpath, '"spec.frspec.file"', frspec.get("file"))] = "the FR-Spec table of spec.frspec"
    unlisted = sorted(set(needed) - set(files))
    if unlisted:
        raise _fail(mpath, f'"files" has no size/sha256 record for {", ".join(unlisted)} '
                           f"({', '.join(needed[n] for n in unlisted)})")
    engines = manifest.get("engines") or []
    if not isinstance(engines, list):
        raise _fail(mpath, f'"engines" must be a list of engine records, got {_short(engines)}')
    for i, rec in enumerate(engines):
        where = f'"engines" entry {i}'
        _check_name(mpath, f"{where} \"file\"", rec.get("file") if isinstance(rec, dict) else None)
        _check_record(mpath, f"{where} ({rec['file']})", rec)

    config = ModelConfig.from_dict(manifest["config"], source=f"{mpath} (\"config\")")
    _check_graph_io(mpath, manifest["graphs"]["decoder"], config, frspec)
    return config


def _check_graph_io(mpath: Path, graph: dict, cfg: ModelConfig, frspec: dict | None) -> None:
    """The decoder's inputs/outputs as the manifest lists them agree with its config (DESIGN.md §6)."""
    inputs = {d["name"]: d for d in graph["inputs"]}
    outputs = {d["name"]: d for d in graph["outputs"]}
    L = cfg.num_hidden_layers
    layers = sorted(int(n.split(".")[1]) for n in inputs if re.fullmatch(r"past_key\.\d+", n))
    if layers != list(range(L)):
        raise _fail(mpath, f'"config" has num_hidden_layers {L} but graph "decoder" lists '
                           f"{len(layers)} past_key.* inputs ({', '.join(map(str, layers[:4]))}"
                           f"{', ...' if len(layers) > 4 else ''})")
    want_in = ["input_ids", "position_ids", "attn_mask", "logit_index"]
    want_out = ["logits"]
    for i in range(L):
        want_in += [f"past_key.{i}", f"past_value.{i}"] + ([f"past_ckey.{i}"] if cfg.sparse else [])
        want_out += [f"key.{i}", f"value.{i}"] + ([f"ckey.{i}"] if cfg.sparse else [])
    lacking = [n for n in want_in if n not in inputs] + [n for n in want_out if n not in outputs]
    if lacking:
        raise _fail(mpath, f'graph "decoder" lacks {", ".join(lacking[:6])} that its "config" needs')
    if not cfg.sparse and any(n.startswith("past_ckey.") for n in inputs):
        raise _fail(mpath, 'graph "decoder" takes compressed keys (past_ckey.*) but "config" has no sparse_config')
    kv = [cfg.num_key_value_heads, cfg.head_dim]
    for n in (f"past_key.{i}" for i in range(L)):
        if inputs[n]["shape"][-2:] != kv:
            raise _fail(mpath, f'graph "decoder" input {n} has shape {json.dumps(inputs[n]["shape"])}, but '
                               f'"config" needs ["P", {kv[0]}, {kv[1]}] (num_key_value_heads, head_dim)')
    n_logits = frspec.get("r") if frspec else cfg.vocab_size
    shape = outputs["logits"]["shape"]
    if len(shape) != 2 or shape[1] != n_logits:
        raise _fail(mpath, f'graph "decoder" output logits has shape {json.dumps(shape)}, but '
                           f"{'spec.frspec.r' if frspec else 'vocab_size'} is {n_logits}")


# ---- the files' integrity -----------------------------------------------------------------------
def _check_files(path: Path, files: dict, verify: bool) -> None:
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
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
            _unlink(stamp_file)
            raise BundleError(f"{path / name}: sha256 mismatch with {MANIFEST}; the file is corrupted — re-copy "
                              f"or re-export the bundle (`edgecpm verify {path}` lists every bad file)")
    with contextlib.suppress(OSError):  # a read-only bundle is simply hashed on every load
        stamp_file.write_text(stamp)


def _stamp(path: Path, files: dict) -> str:
    """Each file's size and mtime, and the manifest's records: a stamp written after a full check
    matches until a file is replaced (copy, re-export) or the manifest's records change."""
    stats = {n: [(path / n).stat().st_size, (path / n).stat().st_mtime_ns, files[n]["sha256"]] for n in sorted(files)}
    return json.dumps(stats)


@dataclass
class VerifyReport:
    """What `verify_bundle` found: `problems` lists one line per bad file (empty: all good)."""

    path: Path
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"{self.path}: OK, {self.files} files, {self.bytes} bytes match {MANIFEST} (sha256)"
        return (f"{self.path}: {len(self.problems)} of {self.files} files do not match {MANIFEST}:\n  "
                + "\n  ".join(self.problems) + "\nre-copy the bundle (or re-export it; an engine: `edgecpm build`)")


def verify_bundle(path: str | Path, progress: bool = False) -> VerifyReport:
    """Re-hash every file of a bundle (the manifest's files and its engines), whatever the
    `.verified` stamp says, and report each missing, resized or corrupted one. A bad manifest is a
    BundleError. All good: the stamp is renewed; otherwise it is removed, so the next load hashes
    again and refuses the bundle."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise BundleError(f"{path}: no {MANIFEST}; `edgecpm verify` checks an exported bundle folder")
    manifest = read_manifest(mpath)
    check_manifest(manifest, mpath)
    records = dict(manifest["files"])
    for rec in manifest.get("engines") or []:
        records[rec["file"]] = rec
    report = VerifyReport(path, files=len(records))
    present = {}
    for name, rec in records.items():
        f = path / name
        if not f.is_file():
            report.problems.append(f"{name}: missing")
        elif f.stat().st_size != rec["size"]:
            report.problems.append(f"{name}: {f.stat().st_size} bytes, {MANIFEST} says {rec['size']}")
        else:
            present[name] = rec
    report.bytes = sum(rec["size"] for rec in present.values())
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("verifying {task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(path.name, total=report.bytes)
        for name, rec in present.items():
            if sha256_file(path / name, on_chunk=lambda n: bar.advance(task, n)) != rec["sha256"]:
                report.problems.append(f"{name}: sha256 mismatch (corrupted)")
    if report.ok:
        with contextlib.suppress(OSError):
            (path / STAMP).write_text(_stamp(path, manifest["files"]))
    else:
        _unlink(path / STAMP)
    return report


def _unlink(stamp_file: Path) -> None:
    """Drops a stale stamp (the next load hashes again); a read-only bundle has none to drop."""
    with contextlib.suppress(OSError):
        stamp_file.unlink(missing_ok=True)
