"""Runtime safety monitor for LLM serving.

Data path, one package per stage:

    capture/  (inside vLLM)  hidden states -> ActivationFrame -> gRPC
    wire/     decode + validate a frame into a tensor and row metadata
    server/   gRPC service, bounded queue, batching
    score/    detector bundles, packed weights, the fused scorer
    judge/    per-request aggregation and the policy (thresholds, modes)
    report/   verdicts, audit log, Prometheus metrics
"""

__version__ = "0.1.0"
