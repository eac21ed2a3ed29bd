"""Fuzzing: every input in tests/fuzz_corpus/<target>/ (crashes the fuzzer found, kept as
regression tests) replays cleanly, and a short coverage-guided run finds nothing new.

The long run is `make fuzz` / `python -m monitor.tools.fuzz --seconds N`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from monitor.tools.fuzz import CORPUS, TARGETS, seeds

REPO = Path(__file__).resolve().parents[1]
CASES = sorted((t, p) for t in TARGETS for p in (CORPUS / t).glob("*")) \
    if CORPUS.exists() else []


@pytest.mark.parametrize("target,path", CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_corpus_input_replays(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_pass(target: str) -> None:
    for s in seeds(target):
        TARGETS[target](s)


@pytest.mark.timeout(300)
def test_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "monitor.tools.fuzz", "--seconds", "10"],
                       cwd=REPO, capture_output=True, text=True, timeout=280,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    tail = "\n".join(line for line in (r.stdout + r.stderr).splitlines()
                     if "Instrumenting" not in line)[-3000:]
    assert r.returncode == 0, tail
