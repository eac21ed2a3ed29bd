"""ONNX export + the onnxruntime backend: same scores as the unfused reference and torch;
strict load-time refusals; backend selection. (The torch-free server: test_onnx_server.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import reference_scorer as ref
import torch
from onnx import helper, numpy_helper
from test_scorer import activations, build, detector, near_jump, probe, rand_w, sae

from monitor.score import BundleError, Scorer, build_placeholder_bundle, load_bundle
from monitor.score.backend import load_scorer
from monitor.score.bundle import _sha256_file
from monitor.score.onnx_export import export_onnx
from monitor.score.onnx_scorer import OnnxScorer
from monitor.wire.codec import bf16_bits_to_f32

REPO = Path(__file__).resolve().parents[1]
IN_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def as_wire_array(x: torch.Tensor) -> np.ndarray:
    """What the numpy codec hands a scorer for ``x``'s wire dtype (bf16: fp32 by shift)."""
    if x.dtype == torch.bfloat16:
        return bf16_bits_to_f32(x.view(torch.int16).numpy().view(np.uint16))
    return x.numpy()


def mixed_bundle(path: Path, d_ln_eps: float = 1e-5):
    """Probe, multi-logit probe, relu SAE, jumprelu + layer_norm SAE on layer 1; probe on 3."""
    g = torch.Generator().manual_seed(3)
    parts = [probe("p1", 1, g), probe("p3", 1, g, k=3),
             sae("relu_sae", 1, g, activation="relu", k=12),
             sae("jr_ln", 1, g, normalize="layer_norm", scale=2.0, k=10, eps=d_ln_eps,
                 negative_thresholds=True),
             probe("q", 3, g)]
    dets = [detector("a", ("p1", 1.5), bias=-0.2),
            detector("b", ("p3", rand_w(g, 3)), ("relu_sae", rand_w(g, 12))),
            detector("c", ("jr_ln", rand_w(g, 10)), ("p1", -0.7), bias=0.4),
            detector("d", ("q", 1.0))]
    build(path, parts, dets)
    return export_onnx(path)


def assert_onnx_matches(bundle_dir: Path, x: torch.Tensor) -> None:
    """OnnxScorer (bundle loaded torch-free) vs reference (z and scores) and torch Scorer."""
    full = load_bundle(bundle_dir)
    ort_s = OnnxScorer(load_bundle(bundle_dir, load_tensors=False))
    torch_s = Scorer(full)
    xa = as_wire_array(x)
    for layer in full.layers:
        near = near_jump(full, layer, x, 1e-4)  # fp32 rounding may flip an exact jump
        keep = ~np.any([v.any(axis=1) for v in near.values()], axis=0)
        got_z = ort_s.score_components(layer, xa)
        want_z = ref.component_values(full, layer, x)
        for name, cols in torch_s.packed(layer).slices.items():
            ok = ~near[name]
            np.testing.assert_allclose(got_z[:, cols][ok], want_z[name][ok], atol=2e-4,
                                       rtol=2e-4, err_msg=f"{name} @ {layer}")
        got = ort_s.score(layer, xa)
        assert got.dtype == np.float32 and got.shape == (len(x), len(full.detectors_on(layer)))
        np.testing.assert_allclose(got[keep], ref.scores(full, layer, x)[keep], atol=5e-5)
        np.testing.assert_allclose(got[keep], torch_s.score(layer, x)[keep], atol=1e-5)


@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=["x-fp32", "x-fp16", "x-bf16"])
def test_mixed_bundle_matches_reference_and_torch(tmp_path: Path, in_dtype: torch.dtype
                                                  ) -> None:
    mixed_bundle(tmp_path)
    assert_onnx_matches(tmp_path, activations(150, offset=20.0, dtype=in_dtype))


@pytest.mark.parametrize("n_rows", [0, 1, 7, 33])
def test_row_counts_and_odd_d_model(tmp_path: Path, n_rows: int) -> None:
    b = build_placeholder_bundle(tmp_path, model_name="m/odd", d_model=37, n_layers=5,
                                 layers=(1, 4), seed=2)
    export_onnx(tmp_path)
    s = OnnxScorer(load_bundle(tmp_path, load_tensors=False))
    x = np.random.default_rng(n_rows).standard_normal((n_rows, 37)).astype(np.float32)
    for layer in b.layers:
        got = s.score(layer, x)
        assert got.shape == (n_rows, len(b.detectors_on(layer))) and got.dtype == np.float32
        np.testing.assert_allclose(got, Scorer(b).score(layer, torch.from_numpy(x)), atol=1e-5)


def test_default_bundle_graphs_match_torch() -> None:
    """bundles/default ships its graphs (probes build-default exports them)."""
    full = load_bundle(REPO / "bundles/default")
    assert full.onnx is not None and sorted(full.onnx.files) == list(full.layers)
    ort_s, torch_s = OnnxScorer(full), Scorer(full)
    g = torch.Generator().manual_seed(0)
    for layer in full.layers:
        x = torch.randn(64, full.d_model, generator=g) * 2
        np.testing.assert_allclose(ort_s.score(layer, x.numpy()), torch_s.score(layer, x),
                                   atol=1e-5)
        np.testing.assert_allclose(ort_s.score(layer, x.numpy()),
                                   ref.scores(full, layer, x), atol=5e-5)


def test_export_pins_graphs_and_reexport_replaces_them(tmp_path: Path) -> None:
    b = mixed_bundle(tmp_path)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["onnx"]["layers"] == {"1": "layer1.onnx", "3": "layer3.onnx"}
    for f in ("layer1.onnx", "layer3.onnx"):
        assert doc["files"][f] == _sha256_file(tmp_path / f)
    b2 = export_onnx(tmp_path)
    assert b2.sha256 == b.sha256  # deterministic: same bytes, same manifest
    with pytest.raises(TypeError, match=r"must be a numpy\.ndarray"):
        OnnxScorer(b2).score(1, torch.zeros(1, 64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype must be one of"):
        OnnxScorer(b2).score(1, np.zeros((1, 64)))
    with pytest.raises(ValueError, match=r"shape \[n_rows, 64\]"):
        OnnxScorer(b2).score(1, np.zeros((1, 63), np.float32))


def test_gated_and_layer_norm_std_columns_match_torch(tmp_path: Path) -> None:
    """The general epilogue (gated SAE) and layer_norm_std, next to identity columns
    (θ = floor = −inf) on one layer: equal to the torch scorer, which test_sae_formats
    checks against sae_lens itself."""
    g = torch.Generator().manual_seed(11)
    d, k = 64, 12
    tensors = {"g.W_enc": torch.randn(d, k, generator=g) / d**0.5,
               "g.b_enc": 0.2 * torch.randn(k, generator=g),
               "g.b_mag": 0.2 * torch.randn(k, generator=g),
               "g.r_mag": 0.3 * torch.randn(k, generator=g),
               "g.b_dec": 0.3 * torch.randn(d, generator=g)}
    parts = [probe("p", 2, g), probe("p_std", 2, g, preprocessing={
        "normalize": "layer_norm_std", "scale": 0.5, "layer_norm_eps": 0.01})]
    for _, t in parts:
        tensors |= t
    comps = [c for c, _ in parts] + [{
        "name": "g", "kind": "sae_latents", "layer": 2, "activation": "gated",
        "latent_ids": list(range(k)),
        "preprocessing": {"apply_b_dec_to_input": True, "normalize": "layer_norm_std",
                          "scale": 2.0, "layer_norm_eps": 0.1},
        "tensors": {r: f"g.{r}" for r in ("W_enc", "b_enc", "b_mag", "r_mag", "b_dec")}}]
    dets = [detector("a", ("g", rand_w(g, k)), ("p", 0.5)), detector("b", ("p_std", 1.0))]
    from monitor.score import write_bundle

    write_bundle(tmp_path, {"name": "gated", "model": {"name": "test/model", "d_model": d,
                                                       "n_layers": 6},
                            "components": comps, "detectors": dets}, tensors)
    full = export_onnx(tmp_path)
    packed = Scorer(full).packed(2)
    assert packed.mag_scale is not None and packed.ln_std is not None  # both paths built
    x = activations(120, offset=5.0)
    ort_s = OnnxScorer(load_bundle(tmp_path, load_tensors=False))
    z_t = Scorer(full).score_components(2, x).numpy()
    z_o = ort_s.score_components(2, x.numpy())
    gated = packed.slices["g"]
    assert 0.1 < (z_t[:, gated] > 0).mean() < 0.9, "degenerate test: gate always/never open"
    np.testing.assert_allclose(z_o, z_t, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ort_s.score(2, x.numpy()), Scorer(full).score(2, x), atol=1e-5)


# --------------------------------------------------------------------------- refusals


def _rewrite(root: Path, edit) -> None:
    doc = json.loads((root / "manifest.json").read_text())
    edit(doc)
    (root / "manifest.json").write_text(json.dumps(doc))


def _repin(root: Path, fname: str, copy_from: Path | None = None) -> None:
    """Pin `fname`'s sha256 in the manifest (after copying `copy_from` over it, if given)."""
    if copy_from is not None:
        shutil.copy(copy_from, root / fname)
    _rewrite(root, lambda d: d["files"].__setitem__(fname, _sha256_file(root / fname)))


def _replace_graph(root: Path, fname: str, change) -> None:
    model = onnx.load(str(root / fname))
    change(model)
    (root / fname).write_bytes(model.SerializeToString())
    _repin(root, fname)


def _set_meta(key: str, value: str):
    def change(m: onnx.ModelProto) -> None:
        for p in m.metadata_props:
            if p.key == key:
                p.value = value
    return change


def _swap_op(m: onnx.ModelProto) -> None:
    for n in m.graph.node:
        if n.op_type == "Sigmoid":
            n.op_type = "Relu"


def _nan_weight(m: onnx.ModelProto) -> None:
    for i, t in enumerate(m.graph.initializer):
        if t.name == "Wt":
            a = numpy_helper.to_array(t).copy()
            a[0, 0] = np.nan
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, "Wt"))


def _opset16(m: onnx.ModelProto) -> None:
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", 16))


# (case, edit of the exported bundle dir, expected text in the error)
LOAD_CASES = {
    "tampered_graph": (lambda r: (r / "layer1.onnx").write_bytes(
        (r / "layer1.onnx").read_bytes()[:-1] + b"\0"), "files['layer1.onnx']: expected sha256"),
    "stale_export": (lambda r: _rewrite(r, lambda d: d["detectors"][0].__setitem__(
        "bias", 3.0)), "onnx.source_sha256: expected"),
    "missing_layer": (lambda r: _rewrite(r, lambda d: (d["onnx"]["layers"].pop("3"),
                                                       d["files"].pop("layer3.onnx"))),
                      "onnx.layers: expected one graph for each detector layer [1, 3]"),
    "unlisted_graph": (lambda r: _rewrite(r, lambda d: d["onnx"]["layers"].__setitem__(
        "3", "other.onnx")), "onnx.layers['3']: expected an .onnx file listed in files"),
    "orphan_graph": (lambda r: _rewrite(r, lambda d: d.pop("onnx")),
                     "onnx: expected a section naming the ONNX files"),
    "opset": (lambda r: _rewrite(r, lambda d: d["onnx"].__setitem__("opset", 18)),
              "onnx.opset: expected one of [17]"),
}
SCORER_CASES = {
    "swapped_layers": (lambda r: _repin(r, "layer1.onnx",
                                        copy_from=r / "layer3.onnx"),
                       "metadata_props['layer']: expected '1', found '3'"),
    "wrong_digest": (lambda r: _replace_graph(r, "layer1.onnx", _set_meta("source_sha256",
                                                                         "0" * 64)),
                     "metadata_props['source_sha256']"),
    "foreign_op": (lambda r: _replace_graph(r, "layer1.onnx", _swap_op),
                   "graph.node: expected operators from"),
    "non_finite_weight": (lambda r: _replace_graph(r, "layer1.onnx", _nan_weight),
                          "initializer 'Wt': expected finite values"),
    "graph_opset": (lambda r: _replace_graph(r, "layer1.onnx", _opset16),
                    "opset_import: expected {'': 17}"),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_load_refusals(tmp_path: Path, case: str) -> None:
    mixed_bundle(tmp_path)
    edit, text = LOAD_CASES[case]
    edit(tmp_path)
    for tensors in (True, False):
        with pytest.raises(BundleError) as e:
            load_bundle(tmp_path, load_tensors=tensors)
        assert text in str(e.value), str(e.value)


@pytest.mark.parametrize("case", sorted(SCORER_CASES))
def test_graph_refusals(tmp_path: Path, case: str) -> None:
    mixed_bundle(tmp_path)
    edit, text = SCORER_CASES[case]
    edit(tmp_path)
    bundle = load_bundle(tmp_path, load_tensors=False)  # manifest-level checks pass
    with pytest.raises(BundleError) as e:
        OnnxScorer(bundle)
    assert text in str(e.value), str(e.value)


def test_graph_changed_after_load_is_refused(tmp_path: Path) -> None:
    mixed_bundle(tmp_path)
    bundle = load_bundle(tmp_path, load_tensors=False)
    (tmp_path / "layer3.onnx").write_bytes(b"\0" * 10)
    with pytest.raises(BundleError, match=r"files\['layer3.onnx'\]: expected sha256"):
        OnnxScorer(bundle)


# --------------------------------------------------------------------------- backends


def test_backend_selection(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    build_placeholder_bundle(plain, model_name="m", d_model=32, n_layers=4, layers=(1,))
    with pytest.raises(BundleError, match="expected ONNX graphs for the onnxruntime backend"):
        load_scorer(plain, "onnxruntime")
    auto = load_scorer(plain, "auto")
    assert auto.backend == "torch" and "no ONNX graphs" in auto.reason
    export_onnx(plain)
    auto = load_scorer(plain, "auto")
    assert auto.backend in ("torch", "onnxruntime")
    assert "onnxruntime" in auto.reason and "torch" in auto.reason and " ms" in auto.reason
    ort_l = load_scorer(plain, "onnxruntime")
    assert isinstance(ort_l.scorer, OnnxScorer) and ort_l.bundle.components["harmful_intent"
                                                                           ].tensors == {}
    assert load_scorer(plain, "auto", compute_dtype="bf16").backend == "torch"
    with pytest.raises(ValueError, match="expected fp32 with the onnxruntime backend"):
        load_scorer(plain, "onnxruntime", compute_dtype="bf16")
    with pytest.raises(ValueError, match="backend: expected one of"):
        load_scorer(plain, "tensorrt")
