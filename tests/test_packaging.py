"""The package metadata installs without setuptools' deprecation warnings (an SPDX licence string and its file)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_licence_is_an_spdx_string_with_its_file() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # a TOML table here is deprecated: 50 lines of warnings
    for pattern in project["project"]["license-files"]:
        assert list(REPO.glob(pattern)), pattern
    assert "MIT License" in (REPO / "LICENSE").read_text()
    # SPDX strings and license-files need setuptools 77; an older build backend would reject them.
    assert "setuptools>=77" in project["build-system"]["requires"][0]
