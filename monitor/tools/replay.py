"""Replay client: stream synthetic requests to a running monitor and print verdicts.

Until the vLLM capture plugin is in place this is the demo's traffic source. It

1. fetches the capture plan (`GetCapturePlan`);
2. finds, per detector, a direction that raises its score, using only the server's
   `Score` RPC (finite differences of the logit around a random base row), and a step
   length along it that drives the score above `target_score`;
3. simulates engine steps like vLLM does: a prefill frame per plan layer holding the
   prompts of a batch of requests (one span each), then decode frames of one row per
   request, then `RequestFinished`; a `push_fraction` of requests get activations pushed
   along one detector's direction (prompt tokens for prompt-scoped detectors, generated
   tokens otherwise) from a chosen position on, so alerts fire there;
4. prints streamed verdicts, final verdicts and stream errors.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

import grpc
import numpy as np
import torch

from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire.codec import Span, encode_frame

__all__ = ["Push", "ReplayConfig", "ReplayResult", "find_pushes", "run_replay"]

_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ReplayConfig:
    """Replay settings. Lengths in tokens."""

    target: str = "127.0.0.1:50051"
    n_requests: int = 8
    prompt_len: int = 24
    gen_len: int = 16
    push_fraction: float = 0.5
    seed: int = 0
    dtype: str = "bf16"
    concurrency: int = 4  # requests running together (one batch of steps)
    target_score: float = 0.97
    timeout_s: float = 60.0


@dataclass(frozen=True)
class Push:
    """How to push rows of `layer` so that `detector` scores >= the target."""

    detector: str
    layer: int
    base: np.ndarray  # float32 [d_model]: a row scoring low
    direction: np.ndarray  # float32 [d_model], unit norm
    step: float  # length along `direction` that reaches the target score
    scope: str  # "prompt" | "generated" | "both" (from the plan's token kinds)


@dataclass
class ReplayResult:
    """What came back: verdicts, errors, and which requests were pushed where."""

    verdicts: list[monitor_pb2.Verdict] = field(default_factory=list)
    errors: list[monitor_pb2.StreamError] = field(default_factory=list)
    pushed: dict[str, tuple[str, int]] = field(default_factory=dict)  # rid -> (det, position)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _score(stub: monitor_pb2_grpc.MonitorStub, plan: monitor_pb2.CapturePlan, layer: int,
           x: np.ndarray) -> dict[str, np.ndarray]:
    """Score rows via the unary RPC, chunked under the plan's max_frame_bytes."""
    per = max(1, int(plan.max_frame_bytes) // (x.shape[1] * 4) - 1)
    out: dict[str, list[np.ndarray]] = {}
    for i in range(0, x.shape[0], per):
        frame = encode_frame(np.ascontiguousarray(x[i:i + per], dtype=np.float32), seq=1,
                             model=plan.model, layer=layer, spans=[])
        resp = stub.Score(monitor_pb2.ScoreRequest(frame=frame), timeout=60)
        for ts in resp.detectors:
            out.setdefault(ts.detector, []).append(np.asarray(ts.scores, dtype=np.float32))
    return {k: np.concatenate(v) for k, v in out.items()}


def find_pushes(stub: monitor_pb2_grpc.MonitorStub, plan: monitor_pb2.CapturePlan, *,
                seed: int = 0, target_score: float = 0.97) -> list[Push]:
    """Per detector of the plan's layers, a base row, a direction and a step (Score RPC)."""
    rng = np.random.default_rng(seed)
    d = int(plan.d_model)
    pushes: list[Push] = []
    for layer in plan.layers:
        base = rng.standard_normal(d).astype(np.float32)
        h = 0.5
        rows = np.vstack([base[None, :], base[None, :] + h * np.eye(d, dtype=np.float32)])
        s = _score(stub, plan, layer, rows)
        for det, sc in s.items():
            g = (_logit(sc[1:]) - _logit(sc[:1])) / h
            norm = float(np.linalg.norm(g))
            if not math.isfinite(norm) or norm == 0.0:
                continue
            u = (g / norm).astype(np.float32)
            steps = np.array([0.5 * 1.5 ** k for k in range(24)], dtype=np.float32)
            s2 = _score(stub, plan, layer, base[None, :] + steps[:, None] * u[None, :])[det]
            hit = np.flatnonzero(s2 >= target_score)
            if hit.size == 0:
                continue
            pushes.append(Push(det, int(layer), base, u, float(steps[hit[0]]), "both"))
    return pushes


def _verdict_line(v: monitor_pb2.Verdict) -> str:
    sev = monitor_pb2.Severity.Name(v.severity).removeprefix("SEVERITY_").lower()
    kind = "FINAL " if v.final else "ALERT "
    pos = f" at position {v.crossed_at_position}" if v.crossed_at_position >= 0 else ""
    return (f"{kind}{v.request_id} {v.detector}: {sev}{pos} score={v.score:.3f} "
            f"peak={v.peak_score:.3f} mode={v.mode} scored={v.n_tokens_scored} "
            f"unscored={v.n_tokens_unscored}")


def run_replay(cfg: ReplayConfig, out: TextIO | None = sys.stdout) -> ReplayResult:
    """Run one replay against `cfg.target`; returns everything the server sent back."""
    rng = np.random.default_rng(cfg.seed)
    torch_dtype = _TORCH[cfg.dtype]
    result = ReplayResult()
    with grpc.insecure_channel(cfg.target, options=[
            ("grpc.max_send_message_length", 256 << 20)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=cfg.timeout_s)
        stub = monitor_pb2_grpc.MonitorStub(channel)
        plan = stub.GetCapturePlan(monitor_pb2.GetCapturePlanRequest(), timeout=10)
        if out:
            print(f"plan {plan.plan_id}: model {plan.model} d_model {plan.d_model} layers "
                  f"{list(plan.layers)}", file=out)
        pushes = find_pushes(stub, plan, seed=cfg.seed, target_score=cfg.target_score)
        if out:
            for p in pushes:
                print(f"push for {p.detector} on layer {p.layer}: step {p.step:.2f}", file=out)
        d = int(plan.d_model)
        layers = list(plan.layers)
        base_rows = {layer: rng.standard_normal(d).astype(np.float32) for layer in layers}

        # which requests get pushed, by which detector, from which position
        plans: dict[str, tuple[Push, int]] = {}
        rids = [f"replay-{cfg.seed}-{i}" for i in range(cfg.n_requests)]
        for i, rid in enumerate(rids):
            if not pushes or rng.random() >= cfg.push_fraction:
                continue
            p = pushes[i % len(pushes)]
            # rows from `pos` on are pushed (prompt tail and all generated tokens), so a
            # detector of any scope sees them
            pos = int(rng.integers(cfg.prompt_len // 2, max(cfg.prompt_len, 1)))
            plans[rid] = (p, pos)
            result.pushed[rid] = (p.detector, pos)

        def rows(rid: str, layer: int, start: int, n: int) -> torch.Tensor:
            x = 0.3 * rng.standard_normal((n, d)).astype(np.float32) + base_rows[layer]
            pp = plans.get(rid)
            if pp is not None and pp[0].layer == layer:
                p, pos = pp
                positions = np.arange(start, start + n)
                hit = positions >= pos
                x[hit] = 0.3 * rng.standard_normal((int(hit.sum()), d)) + p.base + \
                    p.step * p.direction
            return torch.from_numpy(x).to(torch_dtype)

        outbox: queue.Queue[monitor_pb2.ClientMessage | None] = queue.Queue()
        seq = [0]

        def send_frame(layer: int, parts: list[tuple[str, int, int]]) -> None:
            xs = [rows(rid, layer, start, n) for rid, start, n in parts]
            seq[0] += 1
            spans = [Span(rid, n, start, cfg.prompt_len) for rid, start, n in parts]
            outbox.put(monitor_pb2.ClientMessage(frame=encode_frame(
                torch.cat(xs), seq=seq[0], model=plan.model, layer=layer, spans=spans)))

        def producer() -> None:
            outbox.put(monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
                client_id="replay", model=plan.model, plan_id=plan.plan_id)))
            for b in range(0, len(rids), max(1, cfg.concurrency)):
                batch = rids[b:b + cfg.concurrency]
                for layer in layers:  # prefill step
                    send_frame(layer, [(rid, 0, cfg.prompt_len) for rid in batch])
                for t in range(cfg.gen_len):  # decode steps
                    for layer in layers:
                        send_frame(layer, [(rid, cfg.prompt_len + t, 1) for rid in batch])
                for rid in batch:
                    outbox.put(monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
                        request_id=rid, reason="stop", n_prompt_tokens=cfg.prompt_len,
                        n_generated_tokens=cfg.gen_len)))
            outbox.put(monitor_pb2.ClientMessage(stats=monitor_pb2.ClientStats()))
            outbox.put(None)

        def requests() -> Iterator[monitor_pb2.ClientMessage]:
            while True:
                m = outbox.get()
                if m is None:
                    return
                yield m

        threading.Thread(target=producer, name="replay-producer", daemon=True).start()
        for msg in stub.Stream(requests(), timeout=cfg.timeout_s):
            if msg.HasField("verdict"):
                result.verdicts.append(msg.verdict)
                if out and (msg.verdict.final or msg.verdict.severity):
                    print(_verdict_line(msg.verdict), file=out)
            else:
                result.errors.append(msg.error)
                if out:
                    print(f"ERROR seq={msg.error.seq} {msg.error.reason}: {msg.error.message}",
                          file=out)
    if out:
        n_alert = sum(1 for v in result.verdicts if not v.final)
        n_final = sum(1 for v in result.verdicts if v.final)
        print(f"done: {len(rids)} requests, {len(result.pushed)} pushed "
              f"({', '.join(f'{r}:{d}@{p}' for r, (d, p) in result.pushed.items())}), "
              f"{n_alert} escalations, {n_final} final verdicts, {len(result.errors)} errors",
              file=out)
    return result
