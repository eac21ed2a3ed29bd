"""Who may talk to the sidecar: TLS / mTLS, a bearer token, and where Admin listens.

Access model (defaults in brackets):

- **Transport** [plaintext, loopback bind]: with `tls_cert` + `tls_key` the gRPC port
  speaks TLS only; adding `client_ca` makes it mutual TLS: a client without a
  certificate signed by that CA fails the handshake (no RPC runs, nothing is read).
- **Token** [off]: with `token_file` or `token_env` set, every call on the data and
  Admin ports (gRPC health there too) must carry `authorization: Bearer <token>`
  metadata; otherwise it ends with `UNAUTHENTICATED` before the handler runs and before
  any request message is read (every request of the data port is read by a
  request-streaming handler, `monitor.server.handlers`; Admin's port has a 4 KiB message
  limit), and is counted in `frames_rejected_total{reason="unauthenticated"}`. So an
  unauthenticated peer cannot make the server buffer a request body (the data port's
  message limit is sized for frames, ~129 MiB). The token is compared in constant time,
  read once at start-up, and never logged.
- **Admin** [off]: the `monitor.v1.Admin` service (policy reload) is not served on the
  data port. With `admin_port >= 0` it is served on its own address (`admin_host`,
  loopback by default) with the same TLS and token rules.
- **Health** [data port only]: with `--health-port` gRPC health is also served on its
  own server (same host and TLS, no token: it reveals only SERVING / NOT_SERVING), whose
  4 KiB message limit refuses a bigger request from its length prefix, before reading
  it; orchestrator probes dial it (they cannot send a token). Metrics bind separately
  (`--metrics-host/--metrics-port`).

Thread rules: the interceptor runs on the server's event loop; the token bytes are
immutable after construction.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["AccessConfig", "AccessError", "TokenInterceptor", "bind", "load_token",
           "server_credentials"]

#: Largest accepted token file (a token is a short secret, not a document).
MAX_TOKEN_BYTES = 4096


class AccessError(Exception):
    """Access settings that cannot work (missing file, half a key pair...); one line."""


@dataclass(frozen=True)
class AccessConfig:
    """Transport security, authentication and the Admin address of the sidecar."""

    tls_cert: str | None = None
    """PEM server certificate (chain). With `tls_key`: the gRPC ports speak TLS only."""
    tls_key: str | None = None
    """PEM private key of `tls_cert`."""
    client_ca: str | None = None
    """PEM CA bundle. Set: mutual TLS, every client must present a certificate it signed."""
    token_file: str | None = None
    """File holding the bearer token (surrounding whitespace stripped)."""
    token_env: str | None = None
    """Name of an environment variable holding the bearer token (used if no file)."""
    admin_host: str = "127.0.0.1"
    """Bind address of the Admin service (only with `admin_port >= 0`)."""
    admin_port: int = -1
    """Admin service port; -1: Admin off (the default), 0: any free port."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise AccessError("--tls-cert and --tls-key: expected both or neither, found "
                              f"{'--tls-cert' if self.tls_cert else '--tls-key'} only")
        if self.client_ca is not None and self.tls_cert is None:
            raise AccessError("--tls-client-ca: expected --tls-cert/--tls-key as well "
                              "(mutual TLS needs server TLS), found neither")

    @property
    def tls(self) -> bool:
        """True when the ports speak TLS."""
        return self.tls_cert is not None

    @property
    def admin_enabled(self) -> bool:
        """True when the Admin service is served (on its own address)."""
        return self.admin_port >= 0


def _read(path: str, what: str, limit: int = 1 << 20) -> bytes:
    p = Path(path)
    try:
        if not p.is_file():
            raise AccessError(f"{what} {path}: expected a regular file, found "
                              f"{'nothing' if not p.exists() else 'another kind of file'}")
        data = p.read_bytes()[: limit + 1]
    except OSError as e:
        raise AccessError(f"{what} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise AccessError(f"{what} {path}: expected at most {limit} bytes, found more")
    return data


def load_token(cfg: AccessConfig) -> bytes | None:
    """The bearer token, or None when token auth is off. Raises `AccessError`."""
    if cfg.token_file is not None:
        token = _read(cfg.token_file, "--token-file", MAX_TOKEN_BYTES).strip()
        source = f"--token-file {cfg.token_file}"
    elif cfg.token_env is not None:
        token = os.environ.get(cfg.token_env, "").strip().encode()
        source = f"--token-env {cfg.token_env}"
    else:
        return None
    if not token:
        raise AccessError(f"{source}: expected a non-empty token, found none")
    if b"\n" in token or b"\r" in token:
        raise AccessError(f"{source}: expected a one-line token, found several lines")
    return token


def server_credentials(cfg: AccessConfig) -> grpc.ServerCredentials | None:
    """TLS (or mTLS) server credentials, or None for plaintext. Raises `AccessError`."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    chain = _read(cfg.tls_cert, "--tls-cert")
    key = _read(cfg.tls_key, "--tls-key")
    ca = _read(cfg.client_ca, "--tls-client-ca") if cfg.client_ca is not None else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    """Bind `server` to `address` (TLS when `creds`); the port bound, 0 on failure."""
    if creds is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, creds)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without `authorization: Bearer <token>`.

    The refusal is a handler of the same streaming kind as the method's own, that
    aborts with UNAUTHENTICATED before reading any request message when the method's
    request is streaming (gRPC reads a unary request before any handler runs: a method
    reachable through this interceptor must be registered request-streaming, or served
    under a small message limit).
    """

    def __init__(self, token: bytes, on_refused: Callable[[], None]) -> None:
        self._expected = b"Bearer " + token
        self._on_refused = on_refused

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if self._authorized(handler_call_details):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        self._on_refused()
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED after all
            return handler
        return _deny(handler)


_DENIED = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    req, resp = handler.request_streaming, handler.response_streaming
    des, ser = handler.request_deserializer, handler.response_serializer

    async def abort(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    if req and resp:
        return grpc.stream_stream_rpc_method_handler(abort, des, ser)
    if req:
        return grpc.stream_unary_rpc_method_handler(abort, des, ser)
    if resp:
        return grpc.unary_stream_rpc_method_handler(abort, des, ser)
    return grpc.unary_unary_rpc_method_handler(abort, des, ser)
