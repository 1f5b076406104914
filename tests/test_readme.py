"""The README's configuration table matches what `registry serve` reads."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from registry.config import Config, env_name

README = Path(__file__).resolve().parent.parent / "README.md"

# | `REGISTRY_X` | `--x` | `default` | meaning |
_ROW = re.compile(r"^\| `(REGISTRY_[A-Z_]+)` \| `(--[a-z-]+)` \| ([^|]+) \|", re.M)


def test_readme_configuration_table_lists_every_setting_with_its_flag() -> None:
    rows = {env: flag for env, flag, _ in _ROW.findall(README.read_text())}

    expected = {
        env_name(field.name): "--" + field.name.replace("_", "-")
        for field in dataclasses.fields(Config)
    }

    assert rows == expected
