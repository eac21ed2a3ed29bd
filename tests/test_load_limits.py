"""Issue 8 item 6: policy and bundle-manifest loading limits (size, nesting, aliases,
non-regular files). Each refusal is a PolicyError / BundleError naming what was expected
and found, never a RecursionError, a hang, or a traceback."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from monitor.fileio import FileRefused, read_regular_file
from monitor.judge.policy import (
    MAX_POLICY_BYTES,
    MAX_POLICY_DEPTH,
    PolicyError,
    load_policy,
    parse_policy,
)

pytestmark = pytest.mark.timeout(60)

GOOD = 'version: "v1"\ndetectors:\n  d:\n    thresholds: {warn: 0.5, critical: 0.9}\n'


def _fifo(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    os.mkfifo(p)
    return p


def test_read_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 10)
    assert read_regular_file(f, 10) == b"x" * 10
    with pytest.raises(FileRefused, match="at most 9 bytes"):
        read_regular_file(f, 9)
    with pytest.raises(FileRefused, match="a directory"):
        read_regular_file(tmp_path, 100)
    with pytest.raises(FileRefused, match="a FIFO"):  # no writer: must not block
        read_regular_file(_fifo(tmp_path, "fifo"), 100)
    link = tmp_path / "link"
    link.symlink_to(f)  # ConfigMaps mount through symlinks: followed
    assert read_regular_file(link, 10) == b"x" * 10
    with pytest.raises(FileNotFoundError):
        read_regular_file(tmp_path / "missing", 10)


def test_policy_file_limits(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"  # issue 8: a 10 MB policy cost 2 GB RSS and 25 MB log lines
    big.write_text(GOOD + "#" * (MAX_POLICY_BYTES + 1) + "\n")
    with pytest.raises(PolicyError) as e:
        load_policy(big)
    assert f"at most {MAX_POLICY_BYTES} bytes" in str(e.value) and len(str(e.value)) < 300
    with pytest.raises(PolicyError, match="a FIFO"):
        load_policy(_fifo(tmp_path, "p.yaml"))
    with pytest.raises(PolicyError, match="a directory"):
        load_policy(tmp_path)
    ok = tmp_path / "ok.yaml"
    ok.write_text(GOOD)
    assert load_policy(ok).version == "v1"


@pytest.mark.parametrize("depth", [MAX_POLICY_DEPTH + 1, 100_000])
def test_deep_yaml_nesting_is_a_policy_error(depth: int) -> None:
    text = GOOD + "x: " + "[" * depth + "]" * depth + "\n"
    with pytest.raises(PolicyError) as e:  # 100k levels raised RecursionError before
        parse_policy(text, "deep.yaml")
    assert f"at most {MAX_POLICY_DEPTH} levels" in str(e.value)
    assert "deep.yaml:5" in str(e.value)


def test_yaml_aliases_are_refused() -> None:
    bomb = ('version: "v1"\na: &a ["x", "x", "x", "x", "x", "x", "x", "x"]\n'
            + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                      for p, c in zip("abcdefgh", "bcdefghi", strict=True)))
    with pytest.raises(PolicyError, match="anchors or aliases"):
        parse_policy(bomb, "bomb.yaml")


def test_repo_policies_still_parse() -> None:
    root = Path(__file__).resolve().parents[1]
    paths = [*root.glob("policies/*.yaml"), *root.glob("bundles/*/policy*.yaml")]
    assert paths
    for p in paths:
        load_policy(p)


def test_policy_holder_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    from monitor.judge.reload import PolicyHolder

    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    holder = PolicyHolder(path)
    path.unlink()
    os.mkfifo(path)
    out: list[tuple[bool, str] | None] = []
    t = threading.Thread(target=lambda: out.append(holder.poll()), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "poll blocked on a FIFO"
    res = out[0]
    assert res is not None
    ok, msg = res
    assert not ok and "a FIFO" in msg  # refused once (counted by the server)
    assert holder.poll() is None  # and not again on every poll
    assert holder.policy.version == "v1"  # the old policy stays


def _manifest_dir(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "manifest.json").write_text(text)
    return d


def test_deep_nested_manifest_is_a_bundle_error(tmp_path: Path) -> None:
    from monitor.score import BundleError, load_bundle

    d = _manifest_dir(tmp_path, '{"format": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(BundleError) as e:  # was a RecursionError traceback, exit 1
        load_bundle(d)
    assert "nesting" in str(e.value)


def test_fifo_manifest_is_a_bundle_error(tmp_path: Path) -> None:
    from monitor.score import BundleError, load_bundle

    d = tmp_path / "bundle"
    d.mkdir()
    os.mkfifo(d / "manifest.json")
    with pytest.raises(BundleError, match="a FIFO"):
        load_bundle(d)
