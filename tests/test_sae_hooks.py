"""Hook points end to end: a bundle with an SAE on `blocks.2.hook_resid_pre` and a probe on
`blocks.2.hook_resid_post` is planned, decoded and scored per hook point by a real sidecar
(subprocess, real gRPC socket), against a plain-torch reference of each detector; the SAE
detector's verdicts and audit lines carry the latents that fired, with their labels, as a
plain reference ranks them.

The two hook points share a layer and the same token positions: a server keyed by layer
would either score the SAE on the probe's tensor or drop the second frame as a recompute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODEL, REPO, MonitorServer

from monitor.score import write_bundle
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire import Span, encode_frame

pytestmark = pytest.mark.timeout(120)

D, K, N_LAYERS = 64, 8, 6
PRE, POST = "blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"
POLICY = """\
version: "hooks-v1"
defaults:
  aggregation: {kind: max}
  min_tokens: 1
detectors:
  probe_det:
    mode: alert
    scope: prompt
    thresholds: {warn: 0.5, critical: 0.9}
  sae_det:
    mode: observe
    scope: prompt
    thresholds: {warn: 0.01, critical: 0.02}
"""


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "probe.weight": torch.randn(D, 1, generator=g) / D**0.5,
        "probe.bias": torch.tensor([-0.5]),
        "sae.W_enc": torch.randn(D, K, generator=g) / D**0.5,
        "sae.b_enc": 0.1 * torch.randn(K, generator=g),
        "sae.threshold": 0.05 + 0.1 * torch.rand(K, generator=g),
        "sae.b_dec": 0.05 * torch.randn(D, generator=g),
    }


READOUT = [0.8, -0.3, 1.1, 0.5, 0.0, 0.9, -0.7, 0.4]


@pytest.fixture(scope="module")
def hook_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hooks") / "bundle"
    manifest = {
        "name": "hooks", "model": {"name": MODEL, "d_model": D, "n_layers": N_LAYERS},
        "components": [
            {"name": "probe", "kind": "linear_probe", "layer": 2,
             "tensors": {"weight": "probe.weight", "bias": "probe.bias"}},
            {"name": "sae", "kind": "sae_latents", "layer": 2, "hook_name": PRE,
             "activation": "jumprelu", "latent_ids": list(range(100, 100 + K)),
             "latent_labels": [f"label {j}" for j in range(K)],
             "preprocessing": {"apply_b_dec_to_input": True},
             "tensors": {"W_enc": "sae.W_enc", "b_enc": "sae.b_enc",
                         "threshold": "sae.threshold", "b_dec": "sae.b_dec"}},
        ],
        "detectors": [
            {"name": "probe_det", "token_scope": "prompt",
             "default_thresholds": {"warn": 0.5, "critical": 0.9},
             "inputs": [{"component": "probe", "weight": 1.0}]},
            {"name": "sae_det", "token_scope": "prompt", "bias": -1.0,
             "default_thresholds": {"warn": 0.5, "critical": 0.9},
             "inputs": [{"component": "sae", "latent_weights": READOUT}]},
        ],
    }
    write_bundle(out, manifest, _weights())
    return out


def ref_probe(x: torch.Tensor) -> np.ndarray:
    w = _weights()
    return torch.sigmoid(x.double() @ w["probe.weight"].double()[:, 0]
                         + float(w["probe.bias"])).numpy()


def ref_z(x: torch.Tensor) -> torch.Tensor:
    """JumpReLU encode of the selected latents (float64 [n, K])."""
    w = {k: v.double() for k, v in _weights().items()}
    h = (x.double() - w["sae.b_dec"]) @ w["sae.W_enc"] + w["sae.b_enc"]
    return torch.relu(h) * (h > w["sae.threshold"])


def ref_sae(x: torch.Tensor) -> np.ndarray:
    """The sparse read-out over ``ref_z``."""
    return torch.sigmoid(ref_z(x) @ torch.tensor(READOUT, dtype=torch.float64) - 1.0).numpy()


def ref_latents(x: torch.Tensor) -> list[tuple[int, float, str]]:
    """Fired latents over the rows: (index, peak, label), by weight x peak, at most 8."""
    peak = ref_z(x).max(dim=0).values.numpy()
    fired = [j for j in range(K) if peak[j] > 0]
    fired.sort(key=lambda j: -READOUT[j] * peak[j])
    return [(100 + j, float(peak[j]), f"label {j}") for j in fired[:8]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, hook_bundle: Path):
    srv = MonitorServer(tmp_path_factory.mktemp("hooks-srv"), hook_bundle, POLICY,
                        ["--policy-watch-s", "0"])
    yield srv
    srv.stop()


def _x(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_plan_names_both_hook_points(server: MonitorServer) -> None:
    plan = monitor_pb2_grpc.MonitorStub(server.channel).GetCapturePlan(
        monitor_pb2.GetCapturePlanRequest(), timeout=10)
    assert list(plan.hook_names) == [PRE, POST]  # forward order
    assert list(plan.layers) == [2]


def test_unary_score_reads_the_frames_hook_point(server: MonitorServer) -> None:
    stub = monitor_pb2_grpc.MonitorStub(server.channel)
    x = _x(1, 6)
    for hook, det, ref in ((PRE, "sae_det", ref_sae), (POST, "probe_det", ref_probe)):
        frame = encode_frame(x, seq=1, model=MODEL, layer=2, spans=[], hook_name=hook)
        resp = stub.Score(monitor_pb2.ScoreRequest(frame=frame), timeout=10)
        got = {d.detector: np.array(d.scores) for d in resp.detectors}
        assert set(got) == {det}
        np.testing.assert_allclose(got[det], ref(x), rtol=1e-5, atol=1e-6)


def test_stream_scores_each_hook_point_from_its_own_tensor(server: MonitorServer) -> None:
    r = f"hooks-{uuid.uuid4().hex[:8]}"
    xa, xb = _x(2, 5), _x(3, 5)  # resid_pre rows, resid_post rows, same positions 0..4
    msgs = [
        monitor_pb2.ClientMessage(frame=encode_frame(
            xa, seq=1, model=MODEL, layer=2, spans=[Span(r, 5, 0, 5)], hook_name=PRE)),
        monitor_pb2.ClientMessage(frame=encode_frame(
            xb, seq=2, model=MODEL, layer=2, spans=[Span(r, 5, 0, 5)], hook_name=POST)),
        # a hook point no detector reads: refused by name, counted, the stream goes on
        monitor_pb2.ClientMessage(frame=encode_frame(
            xb, seq=3, model=MODEL, layer=2, spans=[Span(r, 5, 0, 5)],
            hook_name="blocks.2.hook_mlp_out")),
        monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
            request_id=r, reason="stop")),
    ]
    out = list(monitor_pb2_grpc.MonitorStub(server.channel).Stream(iter(msgs), timeout=60))
    finals = {m.verdict.detector: m.verdict for m in out
              if m.HasField("verdict") and m.verdict.final and m.verdict.request_id == r}
    errs = [m.error for m in out if m.HasField("error")]
    assert [(e.reason, e.seq) for e in errs] == [("unknown_hook", 3)]
    assert "blocks.2.hook_mlp_out" in errs[0].message
    assert set(finals) == {"probe_det", "sae_det"}
    assert finals["sae_det"].n_tokens_scored == 5 and finals["probe_det"].n_tokens_scored == 5
    assert finals["sae_det"].peak_score == pytest.approx(ref_sae(xa).max(), rel=1e-5)
    assert finals["probe_det"].peak_score == pytest.approx(ref_probe(xb).max(), rel=1e-5)
    # fired latents with labels: on the SAE detector's verdicts only, as the reference ranks
    want = ref_latents(xa)
    assert want, "the test rows should fire some latent"
    got = [(h.index, h.value, h.label) for h in finals["sae_det"].latents]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[2] for g in got] == [w[2] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-4)
    assert {h.name for h in finals["sae_det"].latents} == {"sae"}
    assert not finals["probe_det"].latents
    esc = [m.verdict for m in out if m.HasField("verdict") and not m.verdict.final
           and m.verdict.request_id == r and m.verdict.detector == "sae_det"]
    assert esc and esc[0].latents  # the escalation (observe: would_alert) names them too
    audit = [a for a in server.audit_lines()
             if a["request_id"] == r and a["detector"] == "sae_det"]
    assert audit and audit[0]["event"] == "would_alert"
    assert [x["index"] for x in audit[0]["latents"]] == [h.index for h in esc[0].latents]
    assert all(x["label"].startswith("label ") for x in audit[0]["latents"])
    # the token trace on the audit line: every in-scope token's own score, as the reference
    np.testing.assert_allclose([t[1] for t in audit[0]["tokens"]], ref_sae(xa), atol=1e-4)
    assert [t[0] for t in audit[0]["tokens"]] == list(range(5))
    # the references differ on the two tensors: scoring the wrong one would fail above
    assert abs(ref_sae(xa).max() - ref_sae(xb).max()) > 1e-3
    assert server.metric("safety_monitor_frames_rejected_total", reason="unknown_hook") == 1
    explain_request(server, r, ref_sae(xa), want)


def explain_request(server: MonitorServer, r: str, scores: np.ndarray,
                    want: list[tuple[int, float, str]]) -> None:
    """`safety-monitor explain` on the server's audit log shows the same evidence."""
    base = [sys.executable, "-m", "monitor.cli", "explain", r, "--audit-log",
            str(server.audit_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    doc = json.loads(subprocess.run([*base, "--json"], capture_output=True, text=True,
                                    check=True, env=env, timeout=60).stdout)
    det = doc["detectors"]["sae_det"]
    assert [(e["event"], e["severity"]) for e in det["events"]] == [("would_alert", "critical")]
    np.testing.assert_allclose([t[1] for t in det["tokens"]], scores, atol=1e-4)
    assert [h["index"] for h in det["latents"]] == [w[0] for w in want]
    text = subprocess.run(base, capture_output=True, text=True, check=True, env=env,
                          timeout=60).stdout
    assert "SAE latents that fired" in text and f"sae#{want[0][0]}" in text
    assert want[0][2] in text and "token scores (last 5 in scope)" in text
    missing = subprocess.run([*base[:4], "nope", *base[5:]], capture_output=True, text=True,
                             env=env, timeout=60)
    assert missing.returncode == 1 and "no audit lines" in missing.stdout


def test_span_refused_on_its_own_is_charged_to_the_frames_hook_point(
        server: MonitorServer) -> None:
    """The rows of a span the codec refuses (here: a bad role) count as unscored for the
    detectors of the frame's hook point. They were charged to the layer's resid_post
    (the probe here), and with a bundle reading no resid_post the worker logged a
    KeyError traceback per refused span."""
    r = f"refused-{uuid.uuid4().hex[:8]}"
    pre = [Span(r, 3, 0, 5, 2), Span(r, 2, 3, 5, 99)]  # role 99: refused on its own
    msgs = [
        monitor_pb2.ClientMessage(frame=encode_frame(
            _x(2, 5), seq=1, model=MODEL, layer=2, spans=pre, hook_name=PRE)),
        monitor_pb2.ClientMessage(frame=encode_frame(
            _x(3, 5), seq=2, model=MODEL, layer=2, spans=[Span(r, 5, 0, 5)], hook_name=POST)),
        monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
            request_id=r, reason="stop", n_prompt_tokens=5, n_generated_tokens=1)),
    ]
    out = list(monitor_pb2_grpc.MonitorStub(server.channel).Stream(iter(msgs), timeout=60))
    assert [(m.error.reason, m.error.seq) for m in out if m.HasField("error")] == [
        ("bad_spans", 1)]
    finals = {m.verdict.detector: m.verdict for m in out
              if m.HasField("verdict") and m.verdict.final and m.verdict.request_id == r}
    assert (finals["sae_det"].n_tokens_scored, finals["sae_det"].n_tokens_unscored) == (3, 2)
    assert (finals["probe_det"].n_tokens_scored,
            finals["probe_det"].n_tokens_unscored) == (5, 0)
    assert "unexpected error" not in server.log()
