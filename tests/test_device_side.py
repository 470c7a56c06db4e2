"""The device side runs without torch (DESIGN.md §2): importing edgecpm must not import it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import SHARED


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          check=False, timeout=120)


def test_import_edgecpm_does_not_import_torch():
    r = _run("""
        import sys
        import edgecpm
        import edgecpm.config, edgecpm.kv_cache, edgecpm.sampling, edgecpm.generate, edgecpm.session
        import edgecpm.tokenizer, edgecpm.errors, edgecpm.runtimes
        assert edgecpm.Session and edgecpm.Tokenizer and edgecpm.SpecConfig and edgecpm.SamplingParams
        heavy = sorted(m for m in ("torch", "safetensors", "onnx", "sentencepiece") if m in sys.modules)
        print("HEAVY", heavy)
        """)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout


def test_tokenizer_without_torch():
    """Loading the tokenizer (tokenizer.json) and encoding needs no torch either."""
    if not SHARED.is_dir():
        import pytest

        pytest.skip(f"MiniCPM4 reference data not found at {SHARED}")
    r = _run(f"""
        import shutil, sys, tempfile
        from pathlib import Path
        import edgecpm
        d = Path(tempfile.mkdtemp())
        shutil.copy({str(SHARED / "tokenizer.json")!r}, d / "tokenizer.json")
        shutil.copy({str(SHARED / "MiniCPM4-0.5B" / "tokenizer_config.json")!r}, d / "tokenizer_config.json")
        tok = edgecpm.Tokenizer.from_pretrained(d)
        ids = tok.apply_chat_template([{{"role": "user", "content": "hi"}}])
        assert ids[0] == 1 and len(ids) > 5
        print("TORCH", "torch" in sys.modules)
        """)
    assert r.returncode == 0, r.stderr
    assert "TORCH False" in r.stdout, r.stdout


def test_import_with_torch_blocked():
    """With torch made unimportable, `import edgecpm` still works."""
    r = _run("""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import edgecpm
        from edgecpm.kv_cache import parse_bytes
        assert parse_bytes("1MiB") == 1 << 20
        print("OK")
        """)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
