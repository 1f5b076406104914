"""The committed API modules match proto/ (run `just proto` when this fails)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location(
        "generate", ROOT / "proto/generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    generator = _load_generator()
    generator.generate(tmp_path)  # type: ignore[attr-defined]
    stale = [
        name
        for name in generator.GENERATED  # type: ignore[attr-defined]
        if (tmp_path / name).read_bytes() != (ROOT / name).read_bytes()
    ]
    assert not stale, f"{stale} differ from proto/; run `just proto` and commit"
