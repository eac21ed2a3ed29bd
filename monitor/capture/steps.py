"""Per-step bookkeeping: which request and token position each forward-pass row is.

vLLM's V1 model runner (`vllm/v1/worker/gpu_model_runner.py`, also the base of
`CPUModelRunner`) flattens the scheduled tokens of all requests of a step into one
`[num_tokens, d_model]` hidden-state tensor. During the forward pass:

- `runner.input_batch.req_ids[:num_reqs]` names the requests in batch order,
- `runner.query_start_loc.np[:num_reqs + 1]` (host copy) bounds their rows: request `i`
  owns rows `[qsl[i], qsl[i+1])`; rows past `qsl[num_reqs]` are padding,
- `runner.input_batch.num_computed_tokens_cpu[i]` is the position of request `i`'s first
  row (`_prepare_inputs`: positions = num_computed_tokens[req] + offset in the chunk),
- `runner.requests[req_id]` (`CachedRequestState`) holds the prompt length, the
  `SamplingParams` (with `extra_args["correlation_id"]`) and the output token ids.

`StepTracker.layout` turns that into the rows to keep (filtered by the plan's token
kinds and roles) and `(request_id, n_rows, start_position, prompt_len, role)` spans, one
per run of equal `TokenRole` (`monitor.roles`). A request's prompt roles are computed
once, when the tracker first sees it, from `prompt_token_ids` with the session's
`RoleSegmenter`, and kept as run boundaries (`run_starts`, `run_roles`): a step only
looks up the runs its rows cover (`searchsorted`), no per-row Python. The positions the
model actually received (`positions` argument of the decoder layer, captured by the op)
are checked against `num_computed_tokens`: a step whose layout does not match (e.g. a
dummy / profiling run) is skipped and counted, never mislabeled.

Finished requests are found by difference: a request the tracker has seen that is no
longer in `runner.requests` has finished (vLLM pops it in `_update_states` when it is in
`scheduler_output.finished_req_ids`, whatever the reason). The reason is inferred:
"length" (max_tokens / max_model_len reached), "stop" (last token is a stop / EOS token),
else "abort" (client abort — and stop *strings*, which the frontend turns into aborts).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.capture import op
from monitor.constants import CORRELATION_KEY
from monitor.roles import TokenRole, role_runs
from monitor.v1 import monitor_pb2
from monitor.wire.codec import MAX_CORRELATION_ID_BYTES

#: One kept run of rows: (request_id, n_rows, start_position, prompt_len, role).
SpanTuple = tuple[str, int, int, int, int]
_EMPTY_I64 = np.zeros(0, dtype=np.int64)
_EMPTY_I8 = np.zeros(0, dtype=np.int8)

_GENERATED = int(TokenRole.GENERATED)


@dataclass
class RequestInfo:
    """What the tracker remembers about one vLLM request."""

    vllm_id: str
    request_id: str  # vLLM's engine request id: the key on the wire (RowSpan.request_id)
    prompt_len: int
    n_cached: int  # prompt tokens already computed (prefix cache) at first sight
    state: Any  # vLLM CachedRequestState (kept to read output_token_ids at finish)
    rows_seen: int = 0
    run_starts: np.ndarray = field(default_factory=lambda: _EMPTY_I64)  # int64 [n_runs]
    run_roles: np.ndarray = field(default_factory=lambda: _EMPTY_I8)  # int8 [n_runs]
    correlation_id: str = ""  # the caller's label (extra_args), never a key; "" if none
    #: highest position + 1 that a mapped forward pass ran for this request (kept rows or
    #: not): a lower bound on what ran, checked against `output_token_ids` at finish
    ran_to: int = 0


@dataclass
class StepLayout:
    """Rows of one forward pass to keep and how they map to requests.

    Attributes:
        n_rows: number of kept rows (sum of span rows).
        ranges: `(row_start, row_end)` ranges of the forward's rows to keep, in order.
        spans: `(request_id, n_rows, start_position, prompt_len, role)` in row order, one
            per run of equal role (adjacent spans may share a range).
        n_tokens: rows in the forward pass (including padding).
        labels: request id -> caller's correlation id, for requests that have one.
    """

    n_rows: int
    ranges: list[tuple[int, int]]
    spans: list[SpanTuple]
    n_tokens: int
    contiguous: bool = field(default=False)  # ranges == [(0, n_rows)]
    labels: dict[str, str] = field(default_factory=dict)


#: What a label never carries: the C0 controls (NUL included), DEL, the C1 controls (Unicode
#: category Cc) and lone surrogates (Cs, not UTF-8 encodable); each becomes U+FFFD.
LABEL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def clean_label(label: str) -> str:
    """`label` as the wire carries a caller's label: each `LABEL_UNSAFE` character replaced
    by U+FFFD, then cut to `MAX_CORRELATION_ID_BYTES` UTF-8 bytes at a character boundary
    (a U+FFFD is 3 bytes: the cut comes after the replacement). Printable text, any
    script, is kept as is."""
    raw = LABEL_UNSAFE.sub("\ufffd", label).encode()[:MAX_CORRELATION_ID_BYTES]
    return raw.decode("utf-8", "ignore")


def correlation_id(state: Any) -> str | None:
    """The caller's correlation id from `SamplingParams.extra_args`, if any.

    A label only, written by the API caller (any JSON string): `clean_label`, so a
    caller's id never gets a frame or a step refused (a NUL once made the process sender
    drop the whole step, every co-batched request's rows with it) nor puts control
    characters into audit lines, alerts or logs."""
    sp = getattr(state, "sampling_params", None)
    extra = getattr(sp, "extra_args", None) if sp is not None else None
    if isinstance(extra, dict):
        cid = extra.get(CORRELATION_KEY)
        if cid is not None and str(cid):
            return clean_label(str(cid))
    return None


class StepTracker:
    """Maps forward-pass rows to requests/positions; tracks request lifetimes.

    Args:
        runner: vLLM V1 `GPUModelRunner` / `CPUModelRunner` (the object `load_model` ran on).
        max_model_len: to tell "length" from "abort" at finish.
        segment: prompt token ids -> int8 roles (`RoleSegmenter.segment`); None labels
            every prompt token OTHER.
    """

    def __init__(self, runner: Any, max_model_len: int | None = None,
                 segment: Callable[[Sequence[int] | np.ndarray], np.ndarray] | None = None,
                 ) -> None:
        self.runner = runner
        self.max_model_len = max_model_len
        self.segment = segment
        self.requests: dict[str, RequestInfo] = {}
        self.unmapped_steps = 0
        self.role_errors = 0  # requests whose segmentation raised (labelled OTHER)
        self.requests_no_chat_roles = 0  # requests whose whole prompt is OTHER
        #: finishes whose `output_token_ids` held fewer tokens than the forward passes ran
        #: (the count sent was raised to what ran, `_finished_msg`)
        self.generated_count_raised = 0
        self._lock = threading.Lock()

    def _prompt_runs(self, state: Any, plen: int) -> tuple[np.ndarray, np.ndarray]:
        """Run starts (int64) and roles (int8) of the prompt; once per request."""
        if plen <= 0:
            return _EMPTY_I64, _EMPTY_I8
        ids = getattr(state, "prompt_token_ids", None)
        roles = None
        if self.segment is not None and ids is not None and len(ids) == plen:
            try:
                roles = self.segment(ids)
            except Exception:
                self.role_errors += 1
                roles = None
        if roles is None:
            roles = np.full(plen, TokenRole.OTHER, np.int8)
        runs = role_runs(roles)
        if len(runs) == 1 and runs[0][2] == TokenRole.OTHER:
            self.requests_no_chat_roles += 1
        return (np.fromiter((r[0] for r in runs), np.int64, len(runs)),
                np.fromiter((r[2] for r in runs), np.int8, len(runs)))

    @staticmethod
    def _runs(info: RequestInfo, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(start, end, role)`` runs covering positions ``[lo, hi)`` of ``info``."""
        plen = info.prompt_len
        out: list[tuple[int, int, int]] = []
        if lo < plen:
            e = min(hi, plen)
            starts, roles = info.run_starts, info.run_roles
            k = int(np.searchsorted(starts, lo, side="right")) - 1
            p = lo
            while p < e:
                q = min(int(starts[k + 1]) if k + 1 < starts.size else plen, e)
                out.append((p, q, int(roles[k])))
                p, k = q, k + 1
        if hi > plen:
            out.append((max(lo, plen), hi, int(TokenRole.GENERATED)))
        return out

    def _info(self, rid: str, n_computed: int) -> RequestInfo | None:
        info = self.requests.get(rid)
        if info is not None:
            return info
        state = self.runner.requests.get(rid)
        if state is None:
            return None
        plen = int(getattr(state, "num_prompt_tokens", 0) or len(state.prompt_token_ids or ()))
        run_starts, run_roles = self._prompt_runs(state, plen)
        info = RequestInfo(
            vllm_id=rid,
            request_id=rid,
            correlation_id=correlation_id(state) or "",
            prompt_len=plen,
            n_cached=min(int(n_computed), plen),
            state=state,
            run_starts=run_starts,
            run_roles=run_roles,
        )
        self.requests[rid] = info
        return info

    def layout(
        self,
        n_tokens: int,
        positions: np.ndarray | None,
        *,
        prompt: bool = True,
        generated: bool = True,
        roles: frozenset[int] | None = None,
    ) -> StepLayout | None:
        """Layout of the current forward pass, or None when it maps to no request.

        Timed into `op.PROF.layout_*` when `op.PROFILE`.

        Args:
            n_tokens: rows of the forward's hidden-state tensor (incl. padding).
            positions: int64 `[n_tokens]` positions the model received (host), or None.
            prompt / generated: keep rows of these token kinds.
            roles: keep only rows of these `TokenRole`s (None: all roles).
        """
        if not op.PROFILE:
            return self._layout(n_tokens, positions, prompt, generated, roles)
        t0 = time.perf_counter_ns()
        try:
            return self._layout(n_tokens, positions, prompt, generated, roles)
        finally:
            op.PROF.layout_calls += 1
            op.PROF.layout_ns += time.perf_counter_ns() - t0

    def _layout(self, n_tokens: int, positions: np.ndarray | None, prompt: bool,
                generated: bool, roles: frozenset[int] | None) -> StepLayout | None:
        r = self.runner
        ib = r.input_batch
        num_reqs = int(ib.num_reqs)
        if num_reqs <= 0:
            return None
        qsl = r.query_start_loc.np[: num_reqs + 1]
        # one host conversion per step, Python ints below (no numpy scalar per request)
        qsl_l: list[int] = qsl.tolist()
        total = qsl_l[-1]
        if total <= 0 or total > n_tokens:
            self.unmapped_steps += 1
            return None
        nct_l: list[int] = ib.num_computed_tokens_cpu[:num_reqs].tolist()
        if positions is not None:
            # position of each request's first row (clipped: an empty request's start may
            # be n_tokens); must be num_computed_tokens for every non-empty request
            first: list[int] = positions.take(qsl[:-1], mode="clip").tolist()
            if first != nct_l and any(f != c and qsl_l[i + 1] > qsl_l[i]
                                      for i, (f, c) in enumerate(zip(first, nct_l,
                                                                     strict=True))):
                self.unmapped_steps += 1
                return None
        req_ids = ib.req_ids[:num_reqs]
        ranges: list[tuple[int, int]] = []
        spans: list[SpanTuple] = []
        labels: dict[str, str] = {}
        n_rows = 0
        gen_kept = roles is None or _GENERATED in roles
        requests = self.requests
        with self._lock:
            for i in range(num_reqs):
                a, b = qsl_l[i], qsl_l[i + 1]
                if b <= a:
                    continue
                start = nct_l[i]
                info = requests.get(req_ids[i]) or self._info(req_ids[i], start)
                if info is None:
                    continue
                lo, hi = start, start + (b - a)
                if hi > info.ran_to:
                    info.ran_to = hi
                plen = info.prompt_len
                if lo >= plen:  # decode fast path: every row generated, one run
                    if not (generated and gen_kept):
                        continue
                    if ranges and ranges[-1][1] == a:
                        ranges[-1] = (ranges[-1][0], b)
                    else:
                        ranges.append((a, b))
                    spans.append((info.request_id, b - a, lo, plen, _GENERATED))
                    info.rows_seen += b - a
                    n_rows += b - a
                    if info.correlation_id:
                        labels[info.request_id] = info.correlation_id
                    continue
                if not prompt:
                    lo = max(lo, plen)
                if not generated:
                    hi = min(hi, plen)
                if hi <= lo:
                    continue
                for s0, s1, role in self._runs(info, lo, hi):
                    if roles is not None and role not in roles:
                        continue
                    r0, r1 = a + (s0 - start), a + (s1 - start)
                    if ranges and ranges[-1][1] == r0:
                        ranges[-1] = (ranges[-1][0], r1)
                    else:
                        ranges.append((r0, r1))
                    spans.append((info.request_id, s1 - s0, s0, plen, role))
                    info.rows_seen += s1 - s0
                    n_rows += s1 - s0
                    if info.correlation_id:
                        labels[info.request_id] = info.correlation_id
        if n_rows == 0:
            return StepLayout(0, [], [], n_tokens)
        return StepLayout(n_rows, ranges, spans, n_tokens,
                          contiguous=len(ranges) == 1 and ranges[0][0] == 0, labels=labels)

    def collect_finished(self) -> list[monitor_pb2.RequestFinished]:
        """RequestFinished for every tracked request vLLM has released since the last call.

        Thread-safe; may be called from the model thread or a background thread.
        """
        live = self.runner.requests
        if live.keys() >= self.requests.keys():  # none gone: one C-level check (atomic
            return []                            # under the GIL), no per-request Python
        out: list[monitor_pb2.RequestFinished] = []
        with self._lock:
            gone = [rid for rid in list(self.requests) if rid not in live]
            for rid in gone:
                info = self.requests.pop(rid)
                out.append(self._finished_msg(info))
        return out

    def _finished_msg(self, info: RequestInfo) -> monitor_pb2.RequestFinished:
        """The request's RequestFinished: its counts let the sidecar derive the positions
        that never reached it. `n_generated_tokens` is the sampled tokens
        (`output_token_ids`, placeholders -1 left out), but never fewer than the forward
        passes this tracker saw imply: a forward at generated position p ran on a sampled
        token and sampled the next, so a request that ran to position `ran_to` - 1 (past its
        prompt) sampled at least `ran_to - prompt_len + 1` tokens. A lower count (e.g.
        placeholders of async scheduling not yet filled in) is raised to that and counted
        (`generated_count_raised`): the sidecar must never expect fewer rows than ran."""
        st = info.state
        toks = [t for t in (getattr(st, "output_token_ids", None) or []) if t >= 0]
        n_gen = len(toks)
        if info.prompt_len and info.ran_to >= info.prompt_len:
            ran = info.ran_to - info.prompt_len + 1
            if ran > n_gen:
                self.generated_count_raised += 1
                n_gen = ran
        sp = getattr(st, "sampling_params", None)
        reason = "abort"
        max_tokens = getattr(sp, "max_tokens", None)
        stop_ids = set(getattr(sp, "_all_stop_token_ids", ()) or ())
        stop_ids |= set(getattr(sp, "stop_token_ids", None) or ())
        if max_tokens is not None and n_gen >= max_tokens:
            reason = "length"
        elif toks and toks[-1] in stop_ids:
            reason = "stop"
        elif self.max_model_len and info.prompt_len + n_gen >= self.max_model_len:
            reason = "length"
        return monitor_pb2.RequestFinished(
            request_id=info.request_id,
            reason=reason,
            n_prompt_tokens=info.prompt_len,
            n_generated_tokens=n_gen,
            n_cached_prompt_tokens=info.n_cached,
            correlation_id=info.correlation_id,
        )
