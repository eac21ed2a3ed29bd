"""Audit records as OpenTelemetry log records (OTLP), when an exporter is configured.

Enabled only by the standard OpenTelemetry environment: `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`
or `OTEL_EXPORTER_OTLP_ENDPOINT` set (protocol from `OTEL_EXPORTER_OTLP_LOGS_PROTOCOL` /
`OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`, the default, or `grpc`; headers, timeouts
and TLS from the exporter's own `OTEL_EXPORTER_OTLP_*` variables; `OTEL_SERVICE_NAME`,
default "safety-monitor"). Needs the `otlp` extra (opentelemetry-sdk + OTLP exporters;
vLLM installs them too).

One log record per audit line: body = the event (`alert`, `would_alert`, `final`),
severity ERROR for critical, WARN for warn, INFO otherwise, event name
`safety_monitor.<event>`, and attributes `vllm.request_id` (the key collectors join on)
plus every audit field as `safety_monitor.<field>`. Logs only: no traces are emitted.

Thread rules: `emit` is called by the scoring worker; the SDK's batch processor exports
on its own thread, so an unreachable collector never blocks scoring (its bounded queue
drops when full, as the SDK does; export errors are logged by the SDK).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["OtlpAudit", "otlp_configured"]

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otlp_configured(env: Mapping[str, str] | None = None) -> bool:
    """True when an OTLP logs endpoint is set in the environment."""
    e = os.environ if env is None else env
    return any(e.get(v) for v in _ENDPOINT_VARS)


class OtlpAudit:
    """Exports audit records through the OpenTelemetry SDK (batching, own thread).

    Raises:
        RuntimeError: the SDK or the exporter for the chosen protocol is not installed
            (message names the missing package), or the protocol is unknown.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        e = os.environ if env is None else env
        protocol = (e.get("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL")
                    or e.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
        try:
            from opentelemetry.sdk._logs import LoggerProvider
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
            from opentelemetry.sdk.resources import Resource

            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (
                    OTLPLogExporter,
                )
            elif protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # type: ignore[assignment]
                    OTLPLogExporter,
                )
            else:
                raise RuntimeError(f"OTEL_EXPORTER_OTLP_PROTOCOL: expected grpc or "
                                   f"http/protobuf, found {protocol!r}")
        except ImportError as exc:
            raise RuntimeError(f"OTLP export is configured ({_ENDPOINT_VARS[0]} / "
                               f"{_ENDPOINT_VARS[1]}) but {exc.name} is not installed: "
                               f"pip install 'vllm-safety-monitor[otlp]'") from None
        from opentelemetry._logs import SeverityNumber

        self.protocol = protocol
        self._sev = {"critical": SeverityNumber.ERROR, "warn": SeverityNumber.WARN}
        self._info = SeverityNumber.INFO
        resource = Resource.create({"service.name": e.get("OTEL_SERVICE_NAME")
                                    or "safety-monitor"})
        self._provider = LoggerProvider(resource=resource)
        self._provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
        self._logger = self._provider.get_logger("safety_monitor.audit")

    def emit(self, record: Mapping[str, Any]) -> None:
        """Queue one audit record as a log record (never blocks on the network)."""
        attrs: dict[str, str | int | float | bool] = {
            "vllm.request_id": str(record.get("request_id", ""))}
        for k, v in record.items():
            if isinstance(v, (str, int, float, bool)):
                attrs[f"safety_monitor.{k}"] = v
        event = str(record.get("event", "audit"))
        self._logger.emit(body=event, attributes=attrs, event_name=f"safety_monitor.{event}",
                          severity_number=self._sev.get(str(record.get("severity")),
                                                        self._info),
                          severity_text=str(record.get("severity", "")))

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued (up to `timeout_s`) and stop the exporter thread."""
        self._provider.force_flush(int(timeout_s * 1000))
        self._provider.shutdown()
