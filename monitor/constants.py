"""Vocabulary shared by every stage: scopes, severities, modes, hook names, reasons.

One definition per word, imported everywhere (policy parser, bundle loader, tracker,
pipeline, metrics, probes); no stage spells these strings on its own.

- Scopes say which tokens a detector judges: ``prompt``, ``generated`` or ``both``; a
  policy may also name token roles (``monitor.roles.SCOPE_WORDS``, ``scope_roles``).
- Severities are ordered ``none < warn < critical`` (proto ``Severity`` values).
- Modes: ``observe`` (record would-alert only), ``alert``, ``block`` (enforcement).
- :class:`Reason` is the stable ``reason`` label of every refusal and every unscored
  row (``frames_rejected_total``, ``rows_unscored_total``, in-stream ``StreamError``).
- :class:`FinishReason` is the bounded label of ``requests_finished_total``: the
  client's own ``RequestFinished.reason`` when it is one of vLLM's, otherwise what the
  sidecar decided (``stream_closed``, ``orphaned``, ``idle``, ``evicted``,
  ``shutdown``: :data:`SERVER_REASONS`) or ``other``.
- :class:`Incomplete` is why a final verdict is incomplete (audit ``incomplete_reason``,
  label of ``requests_incomplete_total``).
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

__all__ = [
    "CORRELATION_KEY",
    "ENGINE_REASONS",
    "HOOK_NAME_TEMPLATE",
    "MODES",
    "SCOPES",
    "SERVER_REASONS",
    "SEVERITIES",
    "SEVERITY_RANK",
    "FinishReason",
    "Incomplete",
    "Reason",
    "RequestKey",
    "hook_name",
]

#: Token scopes of a detector (policy ``scope``, bundle ``token_scope``).
SCOPES: tuple[str, ...] = ("prompt", "generated", "both")
#: Policy modes.
MODES: tuple[str, ...] = ("observe", "alert", "block")
#: Severities a policy can set thresholds for, ascending (``none`` is below all).
SEVERITIES: tuple[str, ...] = ("warn", "critical")
#: Severity order, equal to the proto ``Severity`` enum values.
SEVERITY_RANK: dict[str, int] = {"none": 0, "warn": 1, "critical": 2}

#: TransformerLens name of the residual stream after decoder layer ``layer``.
HOOK_NAME_TEMPLATE = "blocks.{layer}.hook_resid_post"

#: Key of the caller's label in vLLM ``SamplingParams.extra_args`` (``vllm_xargs``).
CORRELATION_KEY = "correlation_id"


def hook_name(layer: int) -> str:
    """``HOOK_NAME_TEMPLATE`` filled in for ``layer``."""
    return HOOK_NAME_TEMPLATE.format(layer=int(layer))


class Reason(str, Enum):
    """Why a client message or its rows were refused or left unscored (metric label)."""

    # frame validation (monitor.wire.codec)
    MODEL_MISMATCH = "model_mismatch"
    UNKNOWN_LAYER = "unknown_layer"
    UNKNOWN_HOOK = "unknown_hook"  # hook point the server does not score (monitor.wire.hooks)
    DTYPE_UNSPECIFIED = "dtype_unspecified"
    BAD_SHAPE = "bad_shape"
    D_MODEL_MISMATCH = "d_model_mismatch"
    BYTE_LENGTH_MISMATCH = "byte_length_mismatch"
    BAD_SPANS = "bad_spans"
    NON_FINITE = "non_finite"
    OVERSIZED = "oversized"
    TOO_MANY_SPANS = "too_many_spans"
    CORRELATION_ID_TOO_LONG = "correlation_id_too_long"
    #: a projected frame naming a projection the server does not offer now (another bundle,
    #: a server without --worker-projection, a hook point it does not project)
    STALE_PROJECTION = "stale_projection"
    #: shared-memory ring (monitor.wire.shm): a frame naming a ring slot on a stream whose
    #: hello offered no accepted ring (or on the unary Score RPC)
    SHM_NOT_NEGOTIATED = "shm_not_negotiated"
    #: a ring reference outside the ring: slot >= n_slots, byte_length > slot_bytes, bytes
    #: in `data` as well, or a file that no longer holds the slot (truncated)
    SHM_BAD_REF = "shm_bad_ref"
    #: the slot's write sequence is not the one the frame claims (overwritten or never
    #: written): a counted drop of the frame's rows
    SHM_STALE = "shm_stale"
    #: the slot's sequence changed while the server read it (torn): a counted drop
    SHM_TORN = "shm_torn"
    #: the hello's ring was refused (server without --shm, not the same host, bad header)
    SHM_RING_REFUSED = "shm_ring_refused"
    # stream protocol (monitor.server.service)
    OUT_OF_ORDER = "out_of_order"
    BAD_HELLO = "bad_hello"
    EMPTY_MESSAGE = "empty_message"
    PLAN_CHANGED = "plan_changed"
    UNKNOWN_REQUEST = "unknown_request"
    NOT_OWNER = "not_owner"
    REQUEST_ID_TOO_LONG = "request_id_too_long"
    SEQ_GAP_TOO_LARGE = "seq_gap_too_large"
    BAD_STATS = "bad_stats"
    UNDECODABLE = "undecodable"
    # call admission (monitor.server.handlers, monitor.server.access)
    TOO_MANY_STREAMS = "too_many_streams"
    SCORE_BUSY = "score_busy"
    CLIENT_TOO_MANY_STREAMS = "client_too_many_streams"
    CLIENT_SCORE_BUSY = "client_score_busy"
    #: GetCapturePlan / data-port health beyond --max-unary-inflight(-per-client)
    UNARY_BUSY = "unary_busy"
    CLIENT_UNARY_BUSY = "client_unary_busy"
    UNAUTHENTICATED = "unauthenticated"
    # scoring (monitor.server.pipeline)
    QUEUE_FULL = "queue_full"
    SCORER_ERROR = "scorer_error"
    # coverage gaps reported by the client
    PREFIX_CACHED = "prefix_cached"
    # positions of a finished request that never reached the server (dead sidecar,
    # client-side drops), derived from the client's RequestFinished counts
    MISSING = "missing"

    def __str__(self) -> str:
        return self.value


class FinishReason(str, Enum):
    """Why a request was finished (label of ``requests_finished_total``)."""

    # vLLM's finish reasons, forwarded by the capture plugin
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"
    # decided by the sidecar
    STREAM_CLOSED = "stream_closed"  # the owning stream half-closed with it open
    ORPHANED = "orphaned"  # its stream broke and nobody adopted it within the grace
    IDLE = "idle"  # no frame for it within the idle TTL on an open stream
    EVICTED = "evicted"  # the oldest request, removed to stay under --max-requests
    SHUTDOWN = "shutdown"  # open when the sidecar stopped (SIGTERM / SIGINT)
    OTHER = "other"  # any other client-supplied text (the label set stays bounded)

    def __str__(self) -> str:
        return self.value

    @classmethod
    def label(cls, text: str) -> FinishReason:
        """Map free text (a client's ``RequestFinished.reason``) onto the bounded set."""
        try:
            return cls(text)
        except ValueError:
            return cls.OTHER

    @classmethod
    def from_client(cls, text: str) -> FinishReason:
        """A client's ``RequestFinished.reason``: as `label`, but a reason only the sidecar
        decides (:data:`SERVER_REASONS`) is ``other`` (a client cannot pass its finish off
        as the server's)."""
        why = cls.label(text)
        return cls.OTHER if why in SERVER_REASONS else why


class Incomplete(str, Enum):
    """Why a request's final verdict is incomplete: some of its in-scope positions may not
    have been judged (audit ``incomplete_reason``, ``requests_incomplete_total{reason}``).

    With the client's ``RequestFinished`` counts the server knows the gap exactly
    (``n_tokens_missing``): ``missing`` (some positions never arrived), ``no_rows`` (none of
    the request's rows reached this sidecar, e.g. it ran while the sidecar restarted).
    Without them the sidecar closed the request itself and cannot know what it did not
    receive: the :class:`FinishReason` it closed it with (``stream_closed``,
    ``orphaned``, ``idle``, ``evicted``, ``shutdown``).
    """

    MISSING = "missing"
    NO_ROWS = "no_rows"
    STREAM_CLOSED = "stream_closed"
    ORPHANED = "orphaned"
    IDLE = "idle"
    EVICTED = "evicted"
    SHUTDOWN = "shutdown"

    def __str__(self) -> str:
        return self.value


class RequestKey(NamedTuple):
    """Identity of one request in the sidecar: who sent it and the engine's own id.

    ``client`` is the identity of the stream's client (``ClientHello.client_id``; empty
    for a client that sent no hello), ``request_id`` the id the client put in
    ``RowSpan.request_id``. Two clients using the same request id never share state, and
    only streams of the same client can carry a request on after its stream broke.
    """

    client: str
    request_id: str


#: finish reasons vLLM reports (the request ended inside the engine, after sampling a
#: last token that is never fed back, so never captured)
ENGINE_REASONS: frozenset[FinishReason] = frozenset(
    {FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT})
#: finish reasons only the sidecar decides (it closed the request without the client's
#: counts: the final is incomplete with this reason, `Incomplete`)
SERVER_REASONS: frozenset[FinishReason] = frozenset(
    {FinishReason.STREAM_CLOSED, FinishReason.ORPHANED, FinishReason.IDLE,
     FinishReason.EVICTED, FinishReason.SHUTDOWN})
