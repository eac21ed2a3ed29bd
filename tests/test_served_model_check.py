"""The sidecar refuses a bundle whose d_model or layer count differs from the served model
(`serve --served-model DIR`), at start-up, with one line naming field, expected, found."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from monitor.tools.models import check_bundle_matches_model, read_model_shape

if TYPE_CHECKING:
    from monitor.capture.plugin import CaptureSession
    from monitor.wire.hooks import HookPoint

REPO = Path(__file__).resolve().parents[1]


def _model_dir(tmp_path: Path, **cfg) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    base = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 6}
    (d / "config.json").write_text(json.dumps({**base, **cfg}))
    return d


def test_read_model_shape_and_check(tmp_path):
    d = _model_dir(tmp_path)
    s = read_model_shape(d)
    assert (s.architecture, s.d_model, s.n_layers) == ("Qwen3ForCausalLM", 64, 6)
    check_bundle_matches_model(bundle_model="m", bundle_d_model=64, bundle_n_layers=6,
                               model_dir=d)
    with pytest.raises(ValueError, match=r"model\.d_model: expected 64 .* found 576"):
        check_bundle_matches_model(bundle_model="m", bundle_d_model=576, bundle_n_layers=6,
                                   model_dir=d)
    with pytest.raises(ValueError, match=r"model\.n_layers: expected 6 .* found 30"):
        check_bundle_matches_model(bundle_model="m", bundle_d_model=64, bundle_n_layers=30,
                                   model_dir=d)
    # multimodal configs keep the text model's sizes in text_config
    mm = tmp_path / "mm"
    mm.mkdir()
    (mm / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {"hidden_size": 32, "num_hidden_layers": 4}}))
    assert read_model_shape(mm).d_model == 32 and read_model_shape(mm).n_layers == 4
    (mm / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="hidden_size: expected a positive integer"):
        read_model_shape(mm)


def test_serve_refuses_mismatched_bundle_at_start(tmp_path, bundle_dir):
    """conftest's placeholder bundle is d_model 64, 6 layers."""
    wrong = _model_dir(tmp_path, num_hidden_layers=30)
    proc = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "serve", "--bundle", str(bundle_dir),
         "--served-model", str(wrong), "--port", "0", "--metrics-port", "-1"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "model.n_layers: expected 30" in proc.stderr and "found 6" in proc.stderr


def test_recipe_layers_scale_with_depth():
    """`build-default --model` collects the recipes' layers at the same relative depths."""
    from probes.harmful import LAYERS
    from probes.recipes import scaled_layers

    assert scaled_layers(LAYERS, 30) == tuple(LAYERS)
    assert scaled_layers((9, 12, 15, 18), 28) == (8, 11, 14, 17)  # e.g. Qwen2.5-1.5B
    assert scaled_layers((9, 12, 15, 18), 3) == (1, 2)  # tiny test models: unique, in range
    assert all(0 <= x < n for n in range(1, 80) for x in scaled_layers((0, 9, 29), n))


# ------------------------------------------------------------------ plugin side, real socket
def _session(addr: str, sender: str = "auto"):
    """A capture session as `_install` builds it for a 16-layer, d_model 8 model with layers
    3 and 15 wrapped (no vLLM: the runner is only read by forwards, none run here);
    `sender`: `SAFETY_MONITOR_SENDER` (`auto`: the child process on this host path)."""
    from types import SimpleNamespace

    from monitor.capture.config import CaptureConfig
    from monitor.capture.op import SITE_OUT
    from monitor.capture.plugin import CaptureSession

    cfg = CaptureConfig(addr=addr, model="m", plan_timeout_s=1.0, queue_size=16,
                        backoff_s=0.05, backoff_max_s=0.2, stats_period_s=0.1,
                        sender=sender)
    s = CaptureSession(SimpleNamespace(), cfg, model_name="m", d_model=8, n_layers=16,
                       max_rows=32)
    s.wrapped = {3: frozenset({SITE_OUT}), 15: frozenset({SITE_OUT})}
    return s


def _plan_points(s: CaptureSession) -> tuple[HookPoint, ...]:
    """The hook points of the plan the session runs (it must run one)."""
    assert s._state is not None, "no plan in effect"
    return s._state.plan.points


@pytest.mark.parametrize("field,value,message", [
    ("model_n_layers", 30, "model_n_layers: expected 16 (decoder layers of the served model), "
                           "found 30"),
    ("d_model", 576, "d_model: expected 8 (hidden size of the served model), found 576"),
    ("model", "other/model", "capture plan is for model 'other/model' but vLLM serves 'm'"),
])
@pytest.mark.parametrize("sender", ["thread", "process"])
def test_plugin_refuses_plan_of_another_model(field, value, message, sender, caplog):
    """A plan for another model identity, hidden size or depth is refused over a real gRPC
    socket: logged once with field, expected and found, counted in `plans_refused` at every
    refetch, no stream opened (vLLM keeps serving, unmonitored); once the sidecar serves a
    matching plan the same session connects and installs it. With the child-process sender
    the refusal is logged by the child (on the worker's stderr, out of `caplog`'s reach);
    the rest is the same."""
    from capture_sink import CaptureSink
    from conftest import eventually

    from monitor.capture.transport import Plan

    sink = CaptureSink(port=0, model="m", d_model=8, layers=(3, 15)).start()
    sink.plan.model_n_layers = 16
    setattr(sink.plan, field, value)
    s = _session(sink.addr, sender)
    try:
        with caplog.at_level("ERROR", logger="monitor.capture"):
            plan = s.transport.fetch_plan(5.0)  # as `_install` does at start-up
            assert plan is not None
            with pytest.raises(ValueError) as e:
                s.set_plan(plan)
            assert message in str(e.value)
            s.transport.start()
            assert eventually(lambda: s.transport.stats()["plans_refused"] >= 3, 20.0)
            assert not s.transport.connected and sink.n_streams == 0 and s._state is None
        logged = [r.getMessage() for r in caplog.records if "plan refused" in r.getMessage()]
        if sender == "thread":
            assert len(logged) == 1 and message in logged[0] and "unmonitored" in logged[0]

        setattr(sink.plan, field, {"model_n_layers": 16, "d_model": 8, "model": "m"}[field])
        assert eventually(lambda: s.transport.connected and s._state is not None, 20.0)
        assert [hp.name for hp in _plan_points(s)] == [
            "blocks.3.hook_resid_post", "blocks.15.hook_resid_post"]
        assert s.stats()["plans_refused"] >= 3
    finally:
        s.transport.close()
        sink.stop()
    # a server that does not state the depth (0, before the field) is not refused for it
    old = _session("127.0.0.1:1")
    p = Plan.from_proto(sink.plan)
    assert p.n_layers == 16
    old.set_plan(Plan.from_proto(type(sink.plan)(plan_id="x", model="m", d_model=8,
                                                 layers=[3])))


def test_build_default_refuses_a_limit_below_two(tmp_path):
    """`--limit 1` leaves a calibration split empty: refused up front with field, expected
    and found (it used to fail deep in calibration with a numpy error)."""
    from probes.cli import main
    from probes.recipes import MIN_LIMIT, build_default

    assert MIN_LIMIT == 2
    with pytest.raises(ValueError, match=r"limit: expected None or >= 2 .*found 1"):
        build_default(tmp_path / "out", model_path=tmp_path / "absent", limit=1)
    assert main(["build-default", "--model", str(tmp_path / "absent"), "--out",
                 str(tmp_path / "out"), "--limit", "1"]) == 2
    assert not (tmp_path / "out").exists()
