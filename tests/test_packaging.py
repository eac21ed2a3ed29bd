"""Packaging: the wheel carries the default bundle where the demo looks for it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from monitor.tools import demo

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_wheel_data_files_list_every_file_of_the_default_bundle() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = cfg["tool"]["setuptools"]["data-files"][str(demo.WHEEL_BUNDLE)]
    on_disk = sorted(f"bundles/default/{p.name}" for p in (REPO / "bundles/default").iterdir()
                     if p.is_file())
    assert sorted(listed) == on_disk


def test_demo_bundle_lookup_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SAFETY_MONITOR_BUNDLE", str(tmp_path))
    c = demo.default_bundle_candidates()
    assert c[0] == tmp_path and c[1] == REPO / "bundles" / "default"
    assert Path(sys.prefix) / demo.WHEEL_BUNDLE in c
    (tmp_path / "manifest.json").write_text("{}")
    assert demo.resolve_bundle(None, tmp_path)[0] == tmp_path
