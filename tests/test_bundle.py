"""Bundle loading, writing and every refusal (each asserts field, expected and found)."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from monitor.score import BundleError, build_placeholder_bundle, load_bundle, write_bundle

D = 16
N_LAYERS = 30


def valid() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A valid manifest (without files) and its tensors: a probe and a jumprelu SAE."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "probe.weight": torch.randn(D, generator=g),
        "probe.bias": torch.tensor(0.5),
        "probe.mean": torch.randn(D, generator=g),
        "probe.std": torch.rand(D, generator=g) + 0.5,
        "sae.W_enc": torch.randn(D, 3, generator=g),
        "sae.b_enc": torch.randn(3, generator=g),
        "sae.threshold": torch.rand(3, generator=g),
        "sae.b_dec": torch.randn(D, generator=g),
    }
    manifest: dict[str, Any] = {
        "format": "safety-monitor-bundle",
        "format_version": 1,
        "name": "unit-test",
        "description": "test bundle",
        "model": {"name": "test/model", "d_model": D, "n_layers": N_LAYERS},
        "components": [
            {"name": "probe", "kind": "linear_probe", "layer": 9,
             "hook_name": "blocks.9.hook_resid_post",
             "tensors": {"weight": "probe.weight", "bias": "probe.bias",
                         "mean": "probe.mean", "std": "probe.std"}},
            {"name": "sae", "kind": "sae_latents", "layer": 9,
             "hook_name": "blocks.9.hook_resid_post", "activation": "jumprelu",
             "latent_ids": [17, 230, 4051],
             "preprocessing": {"apply_b_dec_to_input": True, "scale": 1.0,
                               "normalize": "none"},
             "tensors": {"W_enc": "sae.W_enc", "b_enc": "sae.b_enc",
                         "threshold": "sae.threshold", "b_dec": "sae.b_dec"}},
        ],
        "detectors": [
            {"name": "harmful_intent", "description": "d",
             "inputs": [{"component": "probe", "weight": 1.0}], "bias": 0.0,
             "token_scope": "prompt", "default_thresholds": {"warn": 0.5, "critical": 0.9},
             "calibration": {"fpr_0.01": 0.62}, "provenance": {"method": "logreg"}},
            {"name": "sae_det", "inputs": [{"component": "sae", "latent_weights": [1, 2, 3]}],
             "token_scope": "both", "default_thresholds": {"critical": 0.8}},
        ],
    }
    return manifest, tensors


def refuse(tmp_path: Path, edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None],
           field: str, *fragments: str) -> BundleError:
    """Apply ``edit`` to a valid bundle, write it, and expect a refusal at ``field``."""
    manifest, tensors = valid()
    edit(manifest, tensors)
    with pytest.raises(BundleError) as info:
        write_bundle(tmp_path / "b", manifest, tensors)
    err = info.value
    assert err.field == field, str(err)
    message = str(err)
    assert message.startswith(f"{tmp_path / 'b'}/manifest.json: {field}: expected ")
    for fragment in fragments:
        assert fragment in message, message
    return err


def rewrite_manifest(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    edit(doc)
    (path / "manifest.json").write_text(json.dumps(doc))


# --------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path: Path) -> None:
    manifest, tensors = valid()
    b = write_bundle(tmp_path / "b", manifest, tensors)
    assert (b.name, b.model_name, b.d_model, b.n_layers) == ("unit-test", "test/model", D, 30)
    assert b.format_version == 1 and b.layers == (9,)
    assert [d.name for d in b.detectors] == ["harmful_intent", "sae_det"]
    probe, sae = b.components["probe"], b.components["sae"]
    assert probe.k == 1 and probe.tensors["weight"].shape == (D, 1)
    assert probe.tensors["bias"].shape == (1,) and probe.activation == "identity"
    assert sae.k == 3 and sae.latent_ids == (17, 230, 4051) and sae.activation == "jumprelu"
    assert sae.preprocessing.apply_b_dec_to_input and sae.hook_name == "blocks.9.hook_resid_post"
    torch.testing.assert_close(sae.tensors["W_enc"], tensors["sae.W_enc"])
    det = b.detector("sae_det")
    assert det.inputs[0].weights == (1.0, 2.0, 3.0) and det.bias == 0.0
    assert det.default_thresholds == {"critical": 0.8} and det.layer == 9
    assert b.detector("harmful_intent").calibration == {"fpr_0.01": 0.62}
    raw = (tmp_path / "b" / "manifest.json").read_bytes()
    assert b.sha256 == hashlib.sha256(raw).hexdigest()
    weights = (tmp_path / "b" / "weights.safetensors").read_bytes()
    assert b.manifest["files"] == {"weights.safetensors": hashlib.sha256(weights).hexdigest()}
    again = load_bundle(tmp_path / "b")
    assert again.sha256 == b.sha256
    # a different weight gives a different identity
    tensors["probe.bias"] = torch.tensor(0.25)
    assert write_bundle(tmp_path / "c", manifest, tensors).sha256 != b.sha256


def test_half_precision_tensors_are_upcast(tmp_path: Path) -> None:
    manifest, tensors = valid()
    tensors["sae.W_enc"] = tensors["sae.W_enc"].to(torch.bfloat16)
    tensors["probe.weight"] = tensors["probe.weight"].to(torch.float16)
    b = write_bundle(tmp_path, manifest, tensors)
    assert b.components["sae"].tensors["W_enc"].dtype == torch.float32
    assert b.components["probe"].tensors["weight"].dtype == torch.float32


def test_several_weight_files(tmp_path: Path) -> None:
    manifest, tensors = valid()
    probe = {k: v for k, v in tensors.items() if k.startswith("probe.")}
    rest = {k: v for k, v in tensors.items() if not k.startswith("probe.")}
    save_file(probe, str(tmp_path / "probe.safetensors"))
    save_file(rest, str(tmp_path / "sae.safetensors"))
    manifest["files"] = {
        n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
        for n in ("probe.safetensors", "sae.safetensors")}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert set(load_bundle(tmp_path).components) == {"probe", "sae"}
    # the same tensor name in two files is ambiguous
    save_file({**rest, "probe.bias": torch.tensor(1.0)}, str(tmp_path / "sae.safetensors"))
    manifest["files"]["sae.safetensors"] = hashlib.sha256(
        (tmp_path / "sae.safetensors").read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"tensor names unique across files, found "
                       r"'probe.bias' also in probe.safetensors"):
        load_bundle(tmp_path)


def test_placeholder_is_labelled(tmp_path: Path) -> None:
    b = build_placeholder_bundle(tmp_path, model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                                 d_model=576, n_layers=30)
    assert "placeholder" in b.name
    assert "no safety meaning" in b.description
    assert all("no safety meaning" in d.description for d in b.detectors)
    assert [(d.name, d.token_scope) for d in b.detectors] == [
        ("harmful_intent", "prompt"), ("deception", "generated"), ("sae_demo", "both")]
    assert b.components["sae_demo"].activation == "jumprelu"
    assert b.layers == (10, 15)
    again = build_placeholder_bundle(tmp_path / "2", model_name="HuggingFaceTB/SmolLM2-135M-"
                                     "Instruct", d_model=576, n_layers=30)
    assert again.sha256 == b.sha256  # deterministic in the seed


# --------------------------------------------------------------------------- file-level


def test_sha_mismatch_names_file_and_both_hashes(tmp_path: Path) -> None:
    manifest, tensors = valid()
    b = write_bundle(tmp_path, manifest, tensors)
    expected = b.manifest["files"]["weights.safetensors"]
    tensors["probe.bias"] = torch.tensor(9.0)
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    actual = hashlib.sha256((tmp_path / "weights.safetensors").read_bytes()).hexdigest()
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path)
    assert info.value.field == "files['weights.safetensors']"
    assert f"expected sha256 {expected}, found sha256 {actual}" in str(info.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest.json: \$: expected a readable manifest"):
        load_bundle(tmp_path)


def test_missing_weights_file(tmp_path: Path) -> None:
    write_bundle(tmp_path, *valid())
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match=r"files\['weights.safetensors'\]: expected a "
                       r"regular file .*, found no such file"):
        load_bundle(tmp_path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    write_bundle(tmp_path, *valid())
    bad = b"\xff" * 8 + b"{}"
    (tmp_path / "weights.safetensors").write_bytes(bad)
    rewrite_manifest(tmp_path, lambda d: d["files"].update(
        {"weights.safetensors": hashlib.sha256(bad).hexdigest()}))
    with pytest.raises(BundleError, match="expected a valid safetensors file, found"):
        load_bundle(tmp_path)


def test_oversized_file_refused_before_reading(tmp_path: Path) -> None:
    write_bundle(tmp_path, *valid())
    with pytest.raises(BundleError, match=r"expected a file of at most 100 bytes, found \d+ b"):
        load_bundle(tmp_path, max_file_bytes=100)


def test_file_name_outside_bundle(tmp_path: Path) -> None:
    write_bundle(tmp_path, *valid())
    rewrite_manifest(tmp_path, lambda d: d["files"].update({"../x.safetensors": "0" * 64}))
    with pytest.raises(BundleError, match=r"files\['../x.safetensors'\]: expected a plain "
                       "file name ending in .safetensors"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("text, found", [
    ("{not json", "invalid JSON"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": NaN}', "non-standard JSON constant NaN"),
    ("[]", "a list []"),
])
def test_bad_json(tmp_path: Path, text: str, found: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path)
    assert found in info.value.found


# --------------------------------------------------------------------------- manifest fields


def _set(path: str, value: Any) -> Callable[[dict[str, Any], dict[str, torch.Tensor]], None]:
    """An edit that sets ``manifest[a][b]...`` (ints index lists) to ``value``."""
    keys = [int(k) if k.isdigit() else k for k in path.split("/")]

    def edit(m: Any, _t: dict[str, torch.Tensor]) -> None:  # dicts and lists (JSON)
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value

    return edit


def _drop(path: str) -> Callable[[dict[str, Any], dict[str, torch.Tensor]], None]:
    keys = [int(k) if k.isdigit() else k for k in path.split("/")]

    def edit(m: Any, _t: dict[str, torch.Tensor]) -> None:  # dicts and lists (JSON)
        for k in keys[:-1]:
            m = m[k]
        del m[keys[-1]]

    return edit


FIELD_CASES = [
    # (edit, field, fragments of the message)
    (_set("format", "other"), "format", ["expected 'safety-monitor-bundle'", 'found "other"']),
    (_set("format_version", 2), "format_version", ["expected 1, found 2"]),
    (_set("extra", 1), "extra", ["unknown key 'extra'"]),
    (_set("name", "has space"), "name", ["a name matching", '"has space"']),
    (_drop("model/d_model"), "model.d_model", ["a value (required), found nothing"]),
    (_set("model/d_model", "16"), "model.d_model", ["an integer in [1, 65537)", '"16"']),
    (_set("model/n_layers", 0), "model.n_layers", ["an integer in [1, 4097), found 0"]),
    (_set("model/name", ""), "model.name", ["a non-empty string"]),
    (_set("components", []), "components", ["a non-empty list, found []"]),
    (_set("components/0/layer", 31), "components[0].layer",
     ["expected an integer in [0, 30), found 31"]),
    (_set("components/0/layer", True), "components[0].layer", ["found true"]),
    (_set("components/1/colour", "red"), "components[1].colour", ["unknown key 'colour'"]),
    (_set("components/1/kind", "mlp"), "components[1].kind",
     ["one of ['linear_probe', 'sae_latents']", '"mlp"']),
    (_set("components/1/name", "probe"), "components[1].name",
     ["a name unique among components", "duplicate 'probe'"]),
    (_set("components/0/hook_name", "blocks.8.hook_resid_pre"), "components[0].hook_name",
     ["a hook point of layer 9", '"blocks.8.hook_resid_pre"']),
    (_set("components/0/hook_name", "blocks.9.attn.hook_z"), "components[0].hook_name",
     ["'blocks.<layer>.hook_<kind>'", '"blocks.9.attn.hook_z"']),
    (_set("components/0/activation", "relu"), "components[0].activation",
     ["one of ['identity']", '"relu"']),
    (_drop("components/1/activation"), "components[1].activation",
     ["one of ['gated', 'jumprelu', 'relu', 'topk']", "found nothing"]),
    (_set("components/1/latent_ids", [1, 2]), "components[1].latent_ids",
     ["3 latent indices (one per column), found 2"]),
    (_set("components/1/latent_ids", [1, 2, 2]), "components[1].latent_ids",
     ["distinct latent indices", "[1, 2, 2]"]),
    (_set("components/1/latent_ids", [1, -2, 3]), "components[1].latent_ids[1]",
     ["an integer in [0, 2147483648), found -2"]),
    (_drop("components/1/latent_ids"), "components[1].latent_ids",
     ["a list of 3 latent indices", "found nothing"]),
    (_drop("components/1/tensors/threshold"), "components[1].tensors.threshold",
     ["a value (required), found nothing"]),
    (_set("components/1/activation", "relu"), "components[1].tensors.threshold",
     ["unknown key 'threshold'"]),
    (_set("components/1/tensors/W_enc", "nope"), "components[1].tensors.W_enc",
     ["a tensor present in the weights files", "no tensor named 'nope'"]),
    (_set("components/0/tensors/W_enc", "sae.W_enc"), "components[0].tensors.W_enc",
     ["unknown key 'W_enc'"]),
    (_set("components/1/preprocessing/scale", 0), "components[1].preprocessing.scale",
     ["a finite number > 0, found 0"]),
    (_set("components/1/preprocessing/normalize", "rms"), "components[1].preprocessing"
     ".normalize", ["one of ['none', 'layer_norm', 'layer_norm_std']", '"rms"']),
    (_set("components/0/preprocessing", {"apply_b_dec_to_input": True}),
     "components[0].preprocessing.apply_b_dec_to_input",
     ["false unless the component has a b_dec tensor", "found true"]),
    (_set("detectors", []), "detectors", ["a non-empty list"]),
    (_set("detectors/1/name", "harmful_intent"), "detectors[1].name",
     ["unique among detectors", "duplicate 'harmful_intent'"]),
    (_set("detectors/0/inputs/0/component", "ghost"), "detectors[0].inputs[0].component",
     ["one of the components ['probe', 'sae']", "found 'ghost'"]),
    (_set("detectors/0/inputs", []), "detectors[0].inputs", ["a non-empty list"]),
    (_set("detectors/1/inputs/0", {"component": "sae", "weight": 1.0}),
     "detectors[1].inputs[0].weight",
     ["'latent_weights' with 3 values (component 'sae' has k = 3)", "found a scalar weight"]),
    (_set("detectors/1/inputs/0/latent_weights", [1, 2]),
     "detectors[1].inputs[0].latent_weights", ["3 weights (k of component 'sae'), found 2"]),
    (_set("detectors/0/inputs/0", {"component": "probe", "weight": 1, "latent_weights": [1]}),
     "detectors[0].inputs[0]", ["exactly one of 'weight'", "found both"]),
    (_set("detectors/0/inputs/0", {"component": "probe"}), "detectors[0].inputs[0]",
     ["exactly one of 'weight'", "found neither"]),
    (_set("detectors/0/inputs/0/weight", "1"), "detectors[0].inputs[0].weight",
     ["a finite number", 'found "1"']),
    (_set("detectors/0/inputs", [{"component": "probe", "weight": 1.0},
                                 {"component": "probe", "weight": 2.0}]),
     "detectors[0].inputs[1].component", ["each component at most once", "'probe' again"]),
    (_set("detectors/0/token_scope", "everything"), "detectors[0].token_scope",
     ["one of ['prompt', 'generated', 'both', 'system', 'user'", '"everything"']),
    (_set("detectors/0/default_thresholds", {"warn": 0.9, "critical": 0.5}),
     "detectors[0].default_thresholds.warn", ["warn < critical (0.5), found 0.9"]),
    (_set("detectors/0/default_thresholds", {"warn": 0.5, "critical": 1.0}),
     "detectors[0].default_thresholds.critical", ["a number in (0, 1), found 1.0"]),
    (_set("detectors/0/default_thresholds", {"warn": 0.0}),
     "detectors[0].default_thresholds.warn", ["a number in (0, 1), found 0.0"]),
    (_set("detectors/0/default_thresholds", {"info": 0.3}),
     "detectors[0].default_thresholds.info", ["unknown key 'info'"]),
    (_set("detectors/0/default_thresholds", {}), "detectors[0].default_thresholds",
     ["at least one of ['warn', 'critical'], found {}"]),
    (_set("detectors/0/calibration", [0.5]), "detectors[0].calibration",
     ["an object, found a list [0.5]"]),
    (_set("detectors/1/inputs", [{"component": "probe", "weight": 1.0}]),
     "components[1].name", ["a component read by at least one detector",
                            "'sae', which no detector reads"]),
]


@pytest.mark.parametrize("edit, field, fragments", FIELD_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(FIELD_CASES)])
def test_field_refusal(tmp_path: Path, edit: Any, field: str, fragments: list[str]) -> None:
    refuse(tmp_path, edit, field, *fragments)


def test_detector_inputs_on_two_layers(tmp_path: Path) -> None:
    def edit(m: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        p2 = copy.deepcopy(m["components"][0])
        p2.update(name="probe_l3", layer=3, hook_name="blocks.3.hook_resid_post")
        m["components"].append(p2)
        m["detectors"][0]["inputs"].append({"component": "probe_l3", "weight": 1.0})

    refuse(tmp_path, edit, "detectors[0].inputs[1].component",
           "a component on layer 9 (all inputs of a detector share one layer)",
           "'probe_l3' on layer 3")


# --------------------------------------------------------------------------- tensor values


def _tensor(name: str, value: torch.Tensor) -> Callable[[dict[str, Any],
                                                          dict[str, torch.Tensor]], None]:
    def edit(_m: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        t[name] = value

    return edit


def test_nan_weights(tmp_path: Path) -> None:
    w = torch.randn(D, 3)
    w[4, 1] = float("nan")
    w[7, 0] = float("inf")
    refuse(tmp_path, _tensor("sae.W_enc", w), "components[1].tensors.W_enc",
           "expected finite values (as float32)", "found 2 non-finite values, first at index "
           "[4, 1]")


def test_float64_overflowing_float32(tmp_path: Path) -> None:
    b = torch.tensor([0.0, 1e300, 0.0], dtype=torch.float64)
    refuse(tmp_path, _tensor("sae.b_enc", b), "components[1].tensors.b_enc",
           "found 1 non-finite values, first at index [1]")


def test_zero_std(tmp_path: Path) -> None:
    std = torch.ones(D)
    std[5] = 0.0
    refuse(tmp_path, _tensor("probe.std", std), "components[0].tensors.std",
           "expected all values > 0, found 0.0 at index 5")


def test_transposed_encoder(tmp_path: Path) -> None:
    refuse(tmp_path, _tensor("sae.W_enc", torch.randn(3, D)), "components[1].tensors.W_enc",
           f"expected shape [{D}, k] with 1 <= k <=", "found [3, 16]")


def test_probe_weight_wrong_d_model(tmp_path: Path) -> None:
    refuse(tmp_path, _tensor("probe.weight", torch.randn(D + 1)), "components[0].tensors"
           ".weight", f"expected shape [{D}] or [{D}, k], found [17]")


def test_bias_shape(tmp_path: Path) -> None:
    refuse(tmp_path, _tensor("sae.b_enc", torch.randn(4)), "components[1].tensors.b_enc",
           "expected shape [3], found [4]")


def test_threshold_shape(tmp_path: Path) -> None:
    refuse(tmp_path, _tensor("sae.threshold", torch.randn(3, 1)),
           "components[1].tensors.threshold", "expected shape [3], found [3, 1]")


def test_b_dec_shape(tmp_path: Path) -> None:
    refuse(tmp_path, _tensor("sae.b_dec", torch.randn(D - 1)), "components[1].tensors.b_dec",
           f"expected shape [{D}], found [15]")


def test_integer_tensor(tmp_path: Path) -> None:
    refuse(tmp_path, _tensor("sae.b_enc", torch.tensor([1, 2, 3])),
           "components[1].tensors.b_enc", "a floating dtype ['F16', 'BF16', 'F32', 'F64']",
           "found I64 ('sae.b_enc')")


def test_multi_logit_probe(tmp_path: Path) -> None:
    manifest, tensors = valid()
    tensors["probe.weight"] = torch.randn(D, 2)
    tensors["probe.bias"] = torch.randn(2)
    manifest["detectors"][0]["inputs"] = [{"component": "probe", "latent_weights": [1, -1]}]
    assert write_bundle(tmp_path / "ok", manifest, tensors).components["probe"].k == 2
    tensors["probe.bias"] = torch.tensor(0.0)  # a scalar bias needs k == 1
    with pytest.raises(BundleError, match=r"tensors.bias: expected shape \[2\], found \[\]"):
        write_bundle(tmp_path / "bad", manifest, tensors)
