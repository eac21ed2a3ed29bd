"""Hook-point naming, plan parsing and the architecture table (no vLLM needed)."""

from __future__ import annotations

import pytest
from torch import nn

from monitor.capture.archs import SUPPORTED, UnsupportedArchitecture, check_architecture
from monitor.capture.op import SITE_IN, SITE_OUT
from monitor.capture.plugin import site_of
from monitor.capture.transport import Plan
from monitor.v1 import monitor_pb2
from monitor.wire.hooks import HOOK_KINDS, HookPoint, parse_hook_name, resid_post


def test_hook_names_round_trip_and_order():
    for layer in (0, 7, 123):
        for kind in HOOK_KINDS:
            hp = parse_hook_name(f"blocks.{layer}.hook_{kind}")
            assert (hp.layer, hp.kind, hp.name) == (layer, kind, f"blocks.{layer}.hook_{kind}")
    names = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out",
             "blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid"]
    assert [h.name for h in sorted(parse_hook_name(n) for n in names)] == [
        "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]
    # op sites follow the same order: the input pair before the output pair of a layer
    assert site_of(parse_hook_name("blocks.2.hook_resid_pre")) == (2, SITE_IN)
    for kind in ("resid_mid", "mlp_out", "resid_post"):
        assert site_of(HookPoint.of(2, kind)) == (2, SITE_OUT)


@pytest.mark.parametrize("bad,msg", [
    ("blocks.1.hook_attn_out", "hook kind"), ("blocks.x.hook_resid_pre", "blocks.<layer>"),
    ("resid_post", "blocks.<layer>"), ("blocks.1.hook_resid_pre ", "blocks.<layer>")])
def test_bad_hook_names_are_refused_naming_the_field(bad, msg):
    with pytest.raises(ValueError, match=msg) as e:
        parse_hook_name(bad, field="CapturePlan.hook_names[3]")
    assert "CapturePlan.hook_names[3]" in str(e.value) and repr(bad) in str(e.value)


def test_plan_from_proto_hook_names_and_legacy_layers():
    legacy = Plan.from_proto(monitor_pb2.CapturePlan(plan_id="p", model="m", d_model=8,
                                                     layers=[15, 3, 3]))
    assert legacy.points == (resid_post(3), resid_post(15)) and legacy.layers == (3, 15)
    p = Plan.from_proto(monitor_pb2.CapturePlan(
        plan_id="p", model="m", d_model=8, layers=[9],
        hook_names=["blocks.4.hook_mlp_out", "blocks.2.hook_resid_pre",
                    "blocks.4.hook_mlp_out"]))
    assert [h.name for h in p.points] == ["blocks.2.hook_resid_pre", "blocks.4.hook_mlp_out"]
    assert p.layers == (2, 4)  # hook_names win over `layers`
    with pytest.raises(ValueError, match=r"hook_names\[1\]"):
        Plan.from_proto(monitor_pb2.CapturePlan(
            plan_id="p", model="m", d_model=8, hook_names=["blocks.1.hook_mlp_out", "oops"]))


def _model(model_cls: str, layer_cls: str, n: int = 2) -> tuple[nn.Module, nn.ModuleList]:
    """A model of class name `model_cls` with `n` layers of class name `layer_cls` at
    `.model.layers`; (model, layers)."""
    layer_t = type(layer_cls, (nn.Module,), {})
    layers = nn.ModuleList([layer_t() for _ in range(n)])
    inner = nn.Module()
    inner.layers = layers
    m = type(model_cls, (nn.Module,), {})()
    m.model = inner
    return m, layers


def test_architecture_table():
    for name, spec in SUPPORTED.items():
        m, layers = _model(name, spec.layer_classes[0])
        assert check_architecture(m, layers) is spec
    m, layers = _model("GPT2LMHeadModel", "GPT2Block")
    with pytest.raises(UnsupportedArchitecture, match=r"'GPT2LMHeadModel'.*refused"):
        check_architecture(m, layers)
    # a known model class holding unexpected layers (e.g. a subclass swapping them)
    m, layers = _model("LlamaForCausalLM", "FancyDecoderLayer")
    with pytest.raises(UnsupportedArchitecture, match="FancyDecoderLayer"):
        check_architecture(m, layers)
