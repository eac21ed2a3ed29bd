from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class TokenKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_KIND_UNSPECIFIED: _ClassVar[TokenKind]
    TOKEN_KIND_PROMPT: _ClassVar[TokenKind]
    TOKEN_KIND_GENERATED: _ClassVar[TokenKind]

class TokenRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_ROLE_UNSPECIFIED: _ClassVar[TokenRole]
    TOKEN_ROLE_SYSTEM: _ClassVar[TokenRole]
    TOKEN_ROLE_USER: _ClassVar[TokenRole]
    TOKEN_ROLE_ASSISTANT: _ClassVar[TokenRole]
    TOKEN_ROLE_GENERATED: _ClassVar[TokenRole]
    TOKEN_ROLE_TEMPLATE: _ClassVar[TokenRole]
    TOKEN_ROLE_TOOL: _ClassVar[TokenRole]
    TOKEN_ROLE_OTHER: _ClassVar[TokenRole]

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_NONE: _ClassVar[Severity]
    SEVERITY_WARN: _ClassVar[Severity]
    SEVERITY_CRITICAL: _ClassVar[Severity]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
TOKEN_KIND_UNSPECIFIED: TokenKind
TOKEN_KIND_PROMPT: TokenKind
TOKEN_KIND_GENERATED: TokenKind
TOKEN_ROLE_UNSPECIFIED: TokenRole
TOKEN_ROLE_SYSTEM: TokenRole
TOKEN_ROLE_USER: TokenRole
TOKEN_ROLE_ASSISTANT: TokenRole
TOKEN_ROLE_GENERATED: TokenRole
TOKEN_ROLE_TEMPLATE: TokenRole
TOKEN_ROLE_TOOL: TokenRole
TOKEN_ROLE_OTHER: TokenRole
SEVERITY_NONE: Severity
SEVERITY_WARN: Severity
SEVERITY_CRITICAL: Severity

class RowSpan(_message.Message):
    __slots__ = ("request_id", "n_rows", "start_position", "prompt_len", "correlation_id", "role")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    N_ROWS_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    n_rows: int
    start_position: int
    prompt_len: int
    correlation_id: str
    role: TokenRole
    def __init__(self, request_id: _Optional[str] = ..., n_rows: _Optional[int] = ..., start_position: _Optional[int] = ..., prompt_len: _Optional[int] = ..., correlation_id: _Optional[str] = ..., role: _Optional[_Union[TokenRole, str]] = ...) -> None: ...

class ActivationFrame(_message.Message):
    __slots__ = ("seq", "model", "layer", "dtype", "shape", "data", "spans", "step", "hook_name", "projection", "shm")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAME_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    seq: int
    model: str
    layer: int
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    spans: _containers.RepeatedCompositeFieldContainer[RowSpan]
    step: int
    hook_name: str
    projection: str
    shm: ShmRef
    def __init__(self, seq: _Optional[int] = ..., model: _Optional[str] = ..., layer: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., spans: _Optional[_Iterable[_Union[RowSpan, _Mapping]]] = ..., step: _Optional[int] = ..., hook_name: _Optional[str] = ..., projection: _Optional[str] = ..., shm: _Optional[_Union[ShmRef, _Mapping]] = ...) -> None: ...

class ShmRef(_message.Message):
    __slots__ = ("slot", "sequence", "byte_length")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    slot: int
    sequence: int
    byte_length: int
    def __init__(self, slot: _Optional[int] = ..., sequence: _Optional[int] = ..., byte_length: _Optional[int] = ...) -> None: ...

class ShmRing(_message.Message):
    __slots__ = ("name", "n_slots", "slot_bytes", "token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    N_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    n_slots: int
    slot_bytes: int
    token: bytes
    def __init__(self, name: _Optional[str] = ..., n_slots: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class RequestFinished(_message.Message):
    __slots__ = ("request_id", "reason", "n_prompt_tokens", "n_generated_tokens", "n_cached_prompt_tokens", "correlation_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    N_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    n_prompt_tokens: int
    n_generated_tokens: int
    n_cached_prompt_tokens: int
    correlation_id: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ..., n_prompt_tokens: _Optional[int] = ..., n_generated_tokens: _Optional[int] = ..., n_cached_prompt_tokens: _Optional[int] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class ClientStats(_message.Message):
    __slots__ = ("dropped_frames", "dropped_rows", "dropped_bytes", "reconnects")
    DROPPED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ROWS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    dropped_frames: int
    dropped_rows: int
    dropped_bytes: int
    reconnects: int
    def __init__(self, dropped_frames: _Optional[int] = ..., dropped_rows: _Optional[int] = ..., dropped_bytes: _Optional[int] = ..., reconnects: _Optional[int] = ...) -> None: ...

class ClientHello(_message.Message):
    __slots__ = ("client_id", "model", "plan_id", "instance_id", "wire_version", "shm_ring")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHM_RING_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    model: str
    plan_id: str
    instance_id: str
    wire_version: int
    shm_ring: ShmRing
    def __init__(self, client_id: _Optional[str] = ..., model: _Optional[str] = ..., plan_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., wire_version: _Optional[int] = ..., shm_ring: _Optional[_Union[ShmRing, _Mapping]] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("hello", "frame", "finished", "stats")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    hello: ClientHello
    frame: ActivationFrame
    finished: RequestFinished
    stats: ClientStats
    def __init__(self, hello: _Optional[_Union[ClientHello, _Mapping]] = ..., frame: _Optional[_Union[ActivationFrame, _Mapping]] = ..., finished: _Optional[_Union[RequestFinished, _Mapping]] = ..., stats: _Optional[_Union[ClientStats, _Mapping]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("request_id", "detector", "score", "severity", "threshold", "crossed_at_position", "final", "mode", "policy_version", "n_tokens_scored", "n_tokens_unscored", "peak_score", "correlation_id", "latents")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CROSSED_AT_POSITION_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_SCORED_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_UNSCORED_FIELD_NUMBER: _ClassVar[int]
    PEAK_SCORE_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    detector: str
    score: float
    severity: Severity
    threshold: float
    crossed_at_position: int
    final: bool
    mode: str
    policy_version: str
    n_tokens_scored: int
    n_tokens_unscored: int
    peak_score: float
    correlation_id: str
    latents: _containers.RepeatedCompositeFieldContainer[LatentHit]
    def __init__(self, request_id: _Optional[str] = ..., detector: _Optional[str] = ..., score: _Optional[float] = ..., severity: _Optional[_Union[Severity, str]] = ..., threshold: _Optional[float] = ..., crossed_at_position: _Optional[int] = ..., final: _Optional[bool] = ..., mode: _Optional[str] = ..., policy_version: _Optional[str] = ..., n_tokens_scored: _Optional[int] = ..., n_tokens_unscored: _Optional[int] = ..., peak_score: _Optional[float] = ..., correlation_id: _Optional[str] = ..., latents: _Optional[_Iterable[_Union[LatentHit, _Mapping]]] = ...) -> None: ...

class LatentHit(_message.Message):
    __slots__ = ("name", "index", "value", "label")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    value: float
    label: str
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., value: _Optional[float] = ..., label: _Optional[str] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "reason", "message", "seq", "request_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    seq: int
    request_id: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., seq: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("verdict", "error", "judged_through", "shm_ack")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    JUDGED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    SHM_ACK_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    error: StreamError
    judged_through: JudgedThrough
    shm_ack: ShmAck
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ..., judged_through: _Optional[_Union[JudgedThrough, _Mapping]] = ..., shm_ack: _Optional[_Union[ShmAck, _Mapping]] = ...) -> None: ...

class ShmAck(_message.Message):
    __slots__ = ("ring", "slots", "sequences")
    RING_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ring: ShmRingAnswer
    slots: _containers.RepeatedScalarFieldContainer[int]
    sequences: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ring: _Optional[_Union[ShmRingAnswer, _Mapping]] = ..., slots: _Optional[_Iterable[int]] = ..., sequences: _Optional[_Iterable[int]] = ...) -> None: ...

class ShmRingAnswer(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class JudgedThrough(_message.Message):
    __slots__ = ("request_id", "position")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    position: int
    def __init__(self, request_id: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class GetCapturePlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Enforcement(_message.Message):
    __slots__ = ("fail_mode", "max_behind_frames", "prompt_hold_ms", "strict_streaming", "holdback_tokens", "hold_bound_ms")
    FAIL_MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_BEHIND_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_HOLD_MS_FIELD_NUMBER: _ClassVar[int]
    STRICT_STREAMING_FIELD_NUMBER: _ClassVar[int]
    HOLDBACK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOLD_BOUND_MS_FIELD_NUMBER: _ClassVar[int]
    fail_mode: str
    max_behind_frames: int
    prompt_hold_ms: int
    strict_streaming: bool
    holdback_tokens: int
    hold_bound_ms: int
    def __init__(self, fail_mode: _Optional[str] = ..., max_behind_frames: _Optional[int] = ..., prompt_hold_ms: _Optional[int] = ..., strict_streaming: _Optional[bool] = ..., holdback_tokens: _Optional[int] = ..., hold_bound_ms: _Optional[int] = ...) -> None: ...

class CapturePlan(_message.Message):
    __slots__ = ("plan_id", "model", "d_model", "layers", "token_kinds", "hook_name_template", "preferred_dtype", "bundle_sha256", "max_frame_bytes", "hook_names", "token_roles", "model_n_layers", "enforcement", "projections")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_KINDS_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAME_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAMES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ROLES_FIELD_NUMBER: _ClassVar[int]
    MODEL_N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_FIELD_NUMBER: _ClassVar[int]
    PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    model: str
    d_model: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    token_kinds: _containers.RepeatedScalarFieldContainer[TokenKind]
    hook_name_template: str
    preferred_dtype: DType
    bundle_sha256: str
    max_frame_bytes: int
    hook_names: _containers.RepeatedScalarFieldContainer[str]
    token_roles: _containers.RepeatedScalarFieldContainer[TokenRole]
    model_n_layers: int
    enforcement: Enforcement
    projections: _containers.RepeatedCompositeFieldContainer[HookProjection]
    def __init__(self, plan_id: _Optional[str] = ..., model: _Optional[str] = ..., d_model: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., token_kinds: _Optional[_Iterable[_Union[TokenKind, str]]] = ..., hook_name_template: _Optional[str] = ..., preferred_dtype: _Optional[_Union[DType, str]] = ..., bundle_sha256: _Optional[str] = ..., max_frame_bytes: _Optional[int] = ..., hook_names: _Optional[_Iterable[str]] = ..., token_roles: _Optional[_Iterable[_Union[TokenRole, str]]] = ..., model_n_layers: _Optional[int] = ..., enforcement: _Optional[_Union[Enforcement, _Mapping]] = ..., projections: _Optional[_Iterable[_Union[HookProjection, _Mapping]]] = ...) -> None: ...

class HookProjection(_message.Message):
    __slots__ = ("hook_name", "version", "d_model", "n_cols", "w", "needs_var")
    HOOK_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    N_COLS_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    NEEDS_VAR_FIELD_NUMBER: _ClassVar[int]
    hook_name: str
    version: str
    d_model: int
    n_cols: int
    w: bytes
    needs_var: bool
    def __init__(self, hook_name: _Optional[str] = ..., version: _Optional[str] = ..., d_model: _Optional[int] = ..., n_cols: _Optional[int] = ..., w: _Optional[bytes] = ..., needs_var: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("frame",)
    FRAME_FIELD_NUMBER: _ClassVar[int]
    frame: ActivationFrame
    def __init__(self, frame: _Optional[_Union[ActivationFrame, _Mapping]] = ...) -> None: ...

class TokenScores(_message.Message):
    __slots__ = ("detector", "scores")
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    detector: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, detector: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("detectors",)
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    detectors: _containers.RepeatedCompositeFieldContainer[TokenScores]
    def __init__(self, detectors: _Optional[_Iterable[_Union[TokenScores, _Mapping]]] = ...) -> None: ...

class ReloadPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadPolicyResponse(_message.Message):
    __slots__ = ("ok", "policy_version", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    policy_version: str
    message: str
    def __init__(self, ok: _Optional[bool] = ..., policy_version: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
