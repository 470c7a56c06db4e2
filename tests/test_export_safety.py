"""`edgecpm export --force` never loses what a user owns; a killed export leaves nothing behind for
long (DESIGN.md §5, §13)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgecpm.bundle import is_bundle, read_manifest
from edgecpm.cli import main

pytest.importorskip("torch", reason="export needs torch (pip install 'edgecpm[export]')")
from edgecpm.export.exporter import export_bundle


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def ckpt(make_checkpoint, tmp_path):
    from conftest import copy_checkpoint

    return copy_checkpoint(make_checkpoint(), tmp_path / "ckpt")


def test_force_refuses_the_checkpoint_itself(ckpt, capsys):
    before = listing(ckpt)
    assert main(["export", str(ckpt), "-o", str(ckpt), "--force"]) == 2
    assert "this is the checkpoint" in capsys.readouterr().err
    assert listing(ckpt) == before


def test_force_refuses_a_folder_holding_the_checkpoint(ckpt, capsys):
    parent = ckpt.parent
    (parent / "notes.txt").write_text("mine")
    before = listing(parent)
    assert main(["export", str(ckpt), "-o", str(parent), "--force"]) == 2
    assert "a folder holding the checkpoint" in capsys.readouterr().err
    assert listing(parent) == before


def test_force_refuses_a_folder_that_is_not_a_bundle(ckpt, tmp_path, capsys):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    assert main(["export", str(ckpt), "-o", str(other), "--force"]) == 2
    assert "is not an edgecpm bundle" in capsys.readouterr().err
    assert listing(other) == ["cat.jpg"]
    # A manifest.json that is not an edgecpm manifest is not a bundle either.
    (other / "manifest.json").write_text('{"name": "a web app"}')
    assert main(["export", str(ckpt), "-o", str(other), "--force"]) == 2
    assert listing(other) == ["cat.jpg", "manifest.json"]


def test_force_replaces_a_bundle(ckpt, tmp_path):
    out = export_bundle(ckpt, tmp_path / "b", progress=False)
    with pytest.raises(Exception, match="already exists; pass --force"):
        export_bundle(ckpt, out, progress=False)
    export_bundle(ckpt, out, dtype="fp16", force=True, progress=False)
    assert read_manifest(out)["dtype"] == "fp16"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_partials_of_dead_exports_are_cleaned(ckpt, tmp_path):
    out = tmp_path / "b"
    export_bundle(ckpt, out, progress=False)
    # What SIGKILL leaves: a half-written folder, and a bundle moved aside before the new one landed.
    stale = tmp_path / f".b.partial-{dead_pid()}"
    (stale / "sub").mkdir(parents=True)
    moved = tmp_path / f".b.replaced-{dead_pid()}"
    out.rename(moved)
    export_bundle(ckpt, tmp_path / "c", progress=False)  # another destination: not touched
    assert stale.exists() and moved.exists()
    export_bundle(ckpt, out, force=True, progress=False)
    assert not stale.exists() and not moved.exists() and is_bundle(out)


def test_killed_export_is_cleaned_by_the_next(ckpt, tmp_path):
    """A real SIGKILL mid-export: the partial folder stays until the next export into that place."""
    out = tmp_path / "b"
    code = ("import sys; from edgecpm.export.exporter import export_bundle; "
            f"export_bundle({str(ckpt)!r}, {str(out)!r}, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        import time

        deadline = time.time() + 120
        while not list(tmp_path.glob(".b.partial-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait()
    partials = list(tmp_path.glob(".b.partial-*"))
    if not partials:
        pytest.skip("the export finished before it could be killed")
    assert not is_bundle(out)
    export_bundle(ckpt, out, progress=False)
    assert is_bundle(out) and not list(tmp_path.glob(".b.partial-*"))
