"""Hot reload of the policy file: `PolicyHolder.reload` (explicit) and `poll` (one
watcher step). The server drives both from one place (`MonitorApp.reload_policy`: file
watch, SIGHUP and the admin RPC, one lock, its own thread); this module starts no
threads and installs no signal handlers.

A valid new policy replaces the current one atomically (one reference assignment; a
reader sees the old or the new :class:`~monitor.judge.policy.Policy`, never a mix). An
invalid one is refused: the old policy stays, the refusal is logged (file, line, reason)
and counted in ``reloads_refused``; ``last_error`` keeps the message for the admin RPC
and health output.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.fileio import FileRefused, read_regular_file
from monitor.judge.policy import (
    MAX_POLICY_BYTES,
    Policy,
    PolicyError,
    check_policy,
    load_policy,
)

__all__ = ["PolicyHolder"]

log = logging.getLogger("monitor.judge")


class PolicyHolder:
    """Holds the current policy loaded from ``path`` and reloads it on demand.

    ``on_change(policy)`` is called after every successful swap, on the thread that
    triggered the reload (watcher thread, SIGHUP helper thread or RPC thread): the
    server uses it to hand the policy to the tracker's own thread. When ``bundle`` is
    given, a policy for which :func:`check_policy` reports an ``error:`` is refused too.
    The initial load happens in the constructor and raises :class:`PolicyError`: a
    sidecar must not start without a valid policy.

    Counters: ``reloads_ok`` (swaps), ``reloads_refused`` (invalid files kept out),
    ``reloads_unchanged`` (reload requested, same content).
    """

    def __init__(
        self,
        path: str | Path,
        on_change: Callable[[Policy], Any] | None = None,
        bundle: Any = None,
    ) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self.bundle = bundle
        self._lock = threading.Lock()
        self.reloads_ok = 0
        self.reloads_refused = 0
        self.reloads_unchanged = 0
        self.last_error: str | None = None
        policy = load_policy(self.path)
        self._refuse_if_unfit(policy)
        self._policy = policy
        self._last_seen_sha = policy.sha256
        log.info(
            "policy %s loaded from %s (sha256 %s, %d detectors)",
            policy.version, self.path, policy.sha256[:12], len(policy.detectors),
        )

    @property
    def policy(self) -> Policy:
        """The current policy (atomic read)."""
        return self._policy

    def _refuse_if_unfit(self, policy: Policy) -> None:
        if self.bundle is None:
            return
        errors = [p for p in check_policy(policy, self.bundle) if p.startswith("error:")]
        if errors:
            raise PolicyError(policy.source, 0, "", "; ".join(e[7:] for e in errors))

    def reload(self) -> tuple[bool, str]:
        """Re-read the file; swap on success, keep the old policy on failure.

        Returns ``(ok, message)``; ``ok`` is True also when the content is unchanged.
        """
        with self._lock:
            old = self._policy
            try:
                new = load_policy(self.path)
                self._last_seen_sha = new.sha256
                if new.sha256 == old.sha256:
                    self.reloads_unchanged += 1
                    return True, f"policy {old.version} unchanged"
                self._refuse_if_unfit(new)
            except PolicyError as e:
                self.reloads_refused += 1
                self.last_error = str(e)
                log.error("policy reload refused, keeping %s: %s", old.version, e)
                return False, f"refused, keeping policy {old.version}: {e}"
            self._policy = new
            self.reloads_ok += 1
            self.last_error = None
            log.info(
                "policy reloaded: %s -> %s (sha256 %s, %d detectors)",
                old.version, new.version, new.sha256[:12], len(new.detectors),
            )
        if self.on_change is not None:
            try:
                self.on_change(new)
            except Exception:
                log.exception("policy on_change callback failed")
        return True, f"policy {new.version} loaded"

    def _file_sha(self) -> str | None:
        try:
            return hashlib.sha256(read_regular_file(self.path, MAX_POLICY_BYTES)).hexdigest()
        except FileRefused as e:  # not a regular file / too large: one counted refusal
            return f"refused: {e}"
        except OSError:
            return None

    def poll(self) -> tuple[bool, str] | None:
        """One watcher step: reload when the file content differs from the content last
        attempted (so a broken file is refused once, not on every poll). Returns the
        reload result, or None when nothing changed or the file is unreadable for now
        (e.g. mid-replacement of a Kubernetes ConfigMap symlink)."""
        sha = self._file_sha()
        if sha is None or sha == self._last_seen_sha:
            return None
        result = self.reload()
        self._last_seen_sha = sha
        return result
