"""Reporting: Prometheus metrics (`metrics.py`) and the JSONL audit log (`audit.py`)."""

from monitor.report.audit import AuditLog, audit_record
from monitor.report.metrics import PREFIX, Metrics, parse_exposition, score_buckets

__all__ = ["PREFIX", "AuditLog", "Metrics", "audit_record", "parse_exposition", "score_buckets"]
