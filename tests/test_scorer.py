"""Fused scorer vs the unfused reference (tests/reference_scorer.py) on random bundles."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference_scorer as ref
import torch

from monitor.score import Bundle, Scorer, build_placeholder_bundle, pack_layer, write_bundle

D = 64
N_LAYERS = 6
IN_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
COMPUTE_DTYPES = [torch.float32, torch.bfloat16]

Part = tuple[dict[str, Any], dict[str, torch.Tensor]]


# --------------------------------------------------------------------------- builders


def probe(name: str, layer: int, g: torch.Generator, *, k: int = 1, mean: bool = True,
          std: bool = True, preprocessing: dict[str, Any] | None = None) -> Part:
    shape = (D,) if k == 1 else (D, k)
    t = {f"{name}.weight": torch.randn(*shape, generator=g) / D**0.5,
         f"{name}.bias": torch.randn(k, generator=g) * 0.3}
    roles = {"weight": f"{name}.weight", "bias": f"{name}.bias"}
    if mean:
        t[f"{name}.mean"] = torch.randn(D, generator=g) * 0.5
        roles["mean"] = f"{name}.mean"
    if std:
        t[f"{name}.std"] = 0.5 + torch.rand(D, generator=g)
        roles["std"] = f"{name}.std"
    comp: dict[str, Any] = {"name": name, "kind": "linear_probe", "layer": layer,
                            "tensors": roles}
    if preprocessing is not None:
        comp["preprocessing"] = preprocessing
    return comp, t


def sae(name: str, layer: int, g: torch.Generator, *, k: int = 16,
        activation: str = "jumprelu", b_dec: bool = True, apply_b_dec: bool = True,
        normalize: str = "none", scale: float = 1.0, eps: float = 1e-5,
        negative_thresholds: bool = False) -> Part:
    t = {f"{name}.W_enc": torch.randn(D, k, generator=g) / D**0.5,
         f"{name}.b_enc": torch.randn(k, generator=g) * 0.2}
    roles = {"W_enc": f"{name}.W_enc", "b_enc": f"{name}.b_enc"}
    if activation == "jumprelu":
        th = 0.1 + 0.6 * torch.rand(k, generator=g)
        if negative_thresholds:
            th[::2] = -th[::2]
        t[f"{name}.threshold"] = th
        roles["threshold"] = f"{name}.threshold"
    if b_dec:
        t[f"{name}.b_dec"] = torch.randn(D, generator=g) * 0.5
        roles["b_dec"] = f"{name}.b_dec"
    comp = {"name": name, "kind": "sae_latents", "layer": layer, "activation": activation,
            "latent_ids": list(range(100, 100 + 7 * k, 7)),
            "preprocessing": {"apply_b_dec_to_input": apply_b_dec, "scale": scale,
                              "normalize": normalize, "layer_norm_eps": eps},
            "tensors": roles}
    return comp, t


def detector(name: str, *inputs: tuple[str, Any], bias: float = 0.0,
             scope: str = "both") -> dict[str, Any]:
    ins = []
    for comp, w in inputs:
        ins.append({"component": comp, "latent_weights": list(w)} if isinstance(w, list)
                   else {"component": comp, "weight": w})
    return {"name": name, "inputs": ins, "bias": bias, "token_scope": scope,
            "default_thresholds": {"warn": 0.5, "critical": 0.9}}


def build(path: Path, parts: list[Part], detectors: list[dict[str, Any]]) -> Bundle:
    tensors: dict[str, torch.Tensor] = {}
    for _, t in parts:
        tensors.update(t)
    manifest = {"name": "test-bundle",
                "model": {"name": "test/model", "d_model": D, "n_layers": N_LAYERS},
                "components": [c for c, _ in parts], "detectors": detectors}
    return write_bundle(path, manifest, tensors)


def rand_w(g: torch.Generator, k: int) -> list[float]:
    return [float(v) for v in torch.randn(k, generator=g)]


def activations(n: int, seed: int = 1, offset: float = 0.3, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D, generator=g) * 1.5 + offset).to(dtype)


# --------------------------------------------------------------------------- comparison


def tolerances(in_dtype: torch.dtype, compute: torch.dtype) -> tuple[float, float]:
    """(atol on column values, atol on scores). The reference sees the same (rounded) x."""
    if compute == torch.bfloat16:  # W and x rounded to 8 mantissa bits, the GEMM output too
        return 0.05, 0.02
    return 2e-4, 5e-5  # fp16 / bf16 inputs upcast exactly to fp32


def near_jump(bundle: Bundle, layer: int, x: torch.Tensor, margin: float
              ) -> dict[str, np.ndarray]:
    """``{component: bool [n_rows, k]}``: a jumprelu pre-activation within ``margin`` of its
    threshold, where rounding may flip the jump (all False for continuous activations)."""
    pre = ref.preactivations(bundle, layer, x)
    near = {}
    for comp in bundle.components_on(layer):
        near[comp.name] = np.zeros_like(pre[comp.name], dtype=bool)
        if comp.activation == "jumprelu" and margin > 0:
            theta = np.maximum(comp.tensors["threshold"].double().numpy(), 0.0)
            near[comp.name] = np.abs(pre[comp.name] - theta) < margin
    return near


def assert_matches(bundle: Bundle, x: torch.Tensor, compute: torch.dtype = torch.float32,
                   layers: tuple[int, ...] | None = None) -> None:
    scorer = Scorer(bundle, compute_dtype=compute)
    z_tol, s_tol = tolerances(x.dtype, compute)
    margin = 0.0 if compute == torch.float32 else 0.06
    for layer in layers or scorer.layers:
        near = near_jump(bundle, layer, x, margin)
        keep = ~np.any([v.any(axis=1) for v in near.values()], axis=0)  # rows for scores
        assert keep.mean() > 0.3, "test data too close to jump thresholds"
        want_z = ref.component_values(bundle, layer, x)
        got_z = scorer.score_components(layer, x)
        assert got_z.dtype == torch.float32
        packed = scorer.packed(layer)
        for name, cols in packed.slices.items():
            ok = ~near[name]
            np.testing.assert_allclose(got_z[:, cols].numpy()[ok], want_z[name][ok],
                                       atol=z_tol, rtol=z_tol, err_msg=f"{name} @ {layer}")
        got = scorer.score(layer, x)
        assert got.dtype == np.float32 and got.shape == (len(x), len(packed.detectors))
        np.testing.assert_allclose(got[keep], ref.scores(bundle, layer, x)[keep], atol=s_tol,
                                   err_msg=f"scores @ {layer}")


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("compute", COMPUTE_DTYPES, ids=["c-fp32", "c-bf16"])
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=["x-fp32", "x-fp16", "x-bf16"])
def test_placeholder_matches_reference(tmp_path: Path, in_dtype: torch.dtype,
                                       compute: torch.dtype) -> None:
    b = build_placeholder_bundle(tmp_path, model_name="test/model", d_model=D,
                                 n_layers=N_LAYERS, layers=(2, 4))
    assert Scorer(b).layers == (2, 4)
    assert_matches(b, activations(200, dtype=in_dtype), compute)


@pytest.mark.parametrize("compute", COMPUTE_DTYPES, ids=["c-fp32", "c-bf16"])
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=["x-fp32", "x-fp16", "x-bf16"])
def test_mixed_layer_matches_reference(tmp_path: Path, in_dtype: torch.dtype,
                                       compute: torch.dtype) -> None:
    """Probe, multi-logit probe, relu and jumprelu SAEs, layer_norm and plain, one layer."""
    g = torch.Generator().manual_seed(3)
    parts = [probe("p1", 1, g), probe("p3", 1, g, k=3),
             sae("relu_sae", 1, g, activation="relu", k=12),
             sae("jr_ln", 1, g, normalize="layer_norm", scale=2.0, k=10)]
    dets = [detector("a", ("p1", 1.5), bias=-0.2),
            detector("b", ("p3", rand_w(g, 3)), ("relu_sae", rand_w(g, 12))),
            detector("c", ("jr_ln", rand_w(g, 10)), ("p1", -0.7), bias=0.4)]
    assert_matches(build(tmp_path, parts, dets), activations(150, dtype=in_dtype), compute)


@pytest.mark.parametrize("activation", ["identity", "relu", "jumprelu"])
def test_activation(tmp_path: Path, activation: str) -> None:
    g = torch.Generator().manual_seed(4)
    if activation == "identity":
        part, w = probe("c", 0, g, k=5), rand_w(g, 5)
    else:
        part, w = sae("c", 0, g, activation=activation, k=24), rand_w(g, 24)
    b = build(tmp_path, [part], [detector("d", ("c", w))])
    x = activations(300)
    z = Scorer(b).score_components(0, x).numpy()
    zero = (z == 0).mean()
    if activation == "identity":
        assert zero == 0 and (z < 0).any()
    else:  # the data must reach both sides of the threshold
        assert 0.1 < zero < 0.9 and (z >= 0).all()
    if activation == "jumprelu":  # the jump: no kept value in (0, θ]
        theta = b.components["c"].tensors["threshold"].numpy()
        assert not ((z > 0) & (z <= theta)).any()
    assert_matches(b, x)


def test_jumprelu_negative_threshold_is_relu_and_jump(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    b = build(tmp_path, [sae("c", 0, g, k=20, negative_thresholds=True)],
              [detector("d", ("c", rand_w(g, 20)))])
    x = activations(200)
    z = Scorer(b).score_components(0, x)
    assert (z >= 0).all()  # relu(p)·[p > θ] with θ < 0 never keeps a negative p
    assert_matches(b, x)


@pytest.mark.parametrize("compute", COMPUTE_DTYPES, ids=["c-fp32", "c-bf16"])
def test_layer_norm_with_scale_and_eps(tmp_path: Path, compute: torch.dtype) -> None:
    """eps large enough to matter; a large row offset that layer_norm must remove.

    bf16 compute uses a small offset: with a large common offset the GEMM output
    (before the folded bias cancels it) is large, and its bf16 rounding dominates.
    """
    g = torch.Generator().manual_seed(6)
    ln = {"normalize": "layer_norm", "scale": 0.25, "layer_norm_eps": 0.05}
    parts = [sae("s", 2, g, normalize="layer_norm", scale=0.25, eps=0.05, k=16),
             probe("p_ln", 2, g, preprocessing=ln), probe("p", 2, g)]
    b = build(tmp_path, parts, [detector("s", ("s", rand_w(g, 16))),
                                detector("p_ln", ("p_ln", 1.0)), detector("p", ("p", 1.0))])
    x = activations(200, offset=30.0 if compute == torch.float32 else 0.3)
    assert_matches(b, x, compute)
    # eps / scale² matters here: without it the values differ
    packed = pack_layer(b, 2)
    assert packed.ln_cols is not None and packed.ln_cols.sum() == 17
    assert packed.ln_eps is not None
    np.testing.assert_allclose(packed.ln_eps[packed.ln_cols].numpy(), 0.05 / 0.25**2)
    # layer_norm columns are centred, so x·W ignores a constant added to every feature
    np.testing.assert_allclose(packed.W[:, packed.ln_cols].sum(0).numpy(), 0, atol=1e-5)


def test_standardisation_is_folded(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(7)
    part = probe("p", 0, g)
    b = build(tmp_path / "a", [part], [detector("d", ("p", 1.0))])
    x = activations(100)
    assert_matches(b, x)
    # the same weights without mean/std score differently: the test data exercises them
    bare = dict(part[0], tensors={"weight": "p.weight", "bias": "p.bias"})
    b2 = build(tmp_path / "b", [(bare, part[1])], [detector("d", ("p", 1.0))])
    assert np.abs(Scorer(b).score(0, x) - Scorer(b2).score(0, x)).max() > 0.05
    # the folded weight is weight / std
    w, std = part[1]["p.weight"], part[1]["p.std"]
    np.testing.assert_allclose(pack_layer(b, 0).W[:, 0].numpy(), (w / std).numpy(), rtol=1e-6)


def test_b_dec_applied_only_when_asked(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(8)
    applied = sae("s", 0, g, activation="relu", apply_b_dec=True)
    gemma = (dict(applied[0], preprocessing={"apply_b_dec_to_input": False}), applied[1])
    w = rand_w(g, 16)
    b1 = build(tmp_path / "a", [applied], [detector("d", ("s", w))])
    b2 = build(tmp_path / "b", [gemma], [detector("d", ("s", w))])
    x = activations(100)
    assert_matches(b1, x)
    assert_matches(b2, x)
    assert np.abs(Scorer(b1).score(0, x) - Scorer(b2).score(0, x)).max() > 0.01


def test_multiple_layers(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(9)
    parts = [probe("p0", 0, g), sae("s3", 3, g, k=8), probe("p5", 5, g), probe("q5", 5, g)]
    dets = [detector("late", ("q5", 1.0), ("p5", -1.0)), detector("early", ("p0", 2.0)),
            detector("mid", ("s3", rand_w(g, 8))), detector("late2", ("p5", 1.0))]
    b = build(tmp_path, parts, dets)
    s = Scorer(b)
    assert s.layers == (0, 3, 5)
    assert s.detectors_on(5) == ("late", "late2")
    assert s.detectors_on(0) == ("early",)
    assert_matches(b, activations(64))
    with pytest.raises(KeyError, match=r"blocks\.1\.hook_resid_post has no detectors"):
        s.score(1, activations(2))


def test_read_out_matrix(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(10)
    parts = [probe("p", 0, g), sae("s", 0, g, k=4)]
    w = [0.5, -1.0, 2.0, 0.25]
    b = build(tmp_path, parts, [detector("x", ("s", w), bias=-1.0), detector("y", ("p", 3.0))])
    pk = pack_layer(b, 0)
    assert pk.W.shape == (D, 5) and pk.W.dtype == torch.float32
    assert pk.detectors == ("x", "y")
    assert pk.slices == {"p": slice(0, 1), "s": slice(1, 5)}
    assert [c.latent_id for c in pk.columns] == [None, 100, 107, 114, 121]
    np.testing.assert_array_equal(pk.R.numpy(), [[0, 3], [0.5, 0], [-1, 0], [2, 0], [0.25, 0]])
    np.testing.assert_array_equal(pk.c.numpy(), [-1.0, 0.0])
    assert pk.theta[0] == float("-inf")
    np.testing.assert_array_equal(pk.theta[1:].numpy(),
                                  b.components["s"].tensors["threshold"].numpy())


@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=["x-fp32", "x-fp16", "x-bf16"])
@pytest.mark.parametrize("compute", COMPUTE_DTYPES, ids=["c-fp32", "c-bf16"])
def test_empty_input(tmp_path: Path, in_dtype: torch.dtype, compute: torch.dtype) -> None:
    b = build_placeholder_bundle(tmp_path, model_name="m", d_model=D, n_layers=N_LAYERS,
                                 layers=(1, 2))
    s = Scorer(b, compute)
    for layer in s.layers:
        out = s.score(layer, torch.empty(0, D, dtype=in_dtype))
        assert out.shape == (0, len(s.detectors_on(layer))) and out.dtype == np.float32


def test_zero_copy_input_is_not_modified(tmp_path: Path) -> None:
    b = build_placeholder_bundle(tmp_path, model_name="m", d_model=D, n_layers=N_LAYERS,
                                 layers=(1,))
    x = activations(20, offset=5.0)
    wire = bytearray(x.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
    view = torch.frombuffer(wire, dtype=torch.bfloat16).view(20, D)
    before = bytes(wire)
    for compute in COMPUTE_DTYPES:
        Scorer(b, compute).score(1, view)
    assert bytes(wire) == before


def test_concurrent_scoring_matches_sequential(tmp_path: Path) -> None:
    b = build_placeholder_bundle(tmp_path, model_name="m", d_model=D, n_layers=N_LAYERS,
                                 layers=(1, 3))
    s = Scorer(b)
    xs = [activations(50, seed=i) for i in range(8)]
    want = [s.score(1 + 2 * (i % 2), x) for i, x in enumerate(xs)]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            got[i] = s.score(1 + 2 * (i % 2), xs[i])
            assert s.detectors_on(1) == ("harmful_intent", "sae_demo")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_array_equal(got[i], want[i])


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    b = build_placeholder_bundle(tmp_path, model_name="m", d_model=D, n_layers=N_LAYERS,
                                 layers=(1,))
    s = Scorer(b)
    with pytest.raises(ValueError, match=r"shape \[n_rows, 64\], got \[3, 65\]"):
        s.score(1, torch.zeros(3, D + 1))
    with pytest.raises(ValueError, match="dtype"):
        s.score(1, torch.zeros(3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        s.score(1, torch.zeros(D))
    with pytest.raises(ValueError, match="compute_dtype"):
        Scorer(b, torch.float16)


def test_jumprelu_is_off_exactly_at_threshold(tmp_path: Path) -> None:
    """``z = p·[p > θ]`` is strict: p == θ gives 0, p just above θ passes through."""
    theta = torch.tensor([0.5, 0.25, 1.0, 0.75])
    b_enc = theta + torch.tensor([0.0, 0.0, 1e-3, -1e-3])
    tensors = {"s.W_enc": torch.zeros(D, 4), "s.b_enc": b_enc, "s.threshold": theta}
    comp = {"name": "s", "kind": "sae_latents", "layer": 0, "activation": "jumprelu",
            "latent_ids": [0, 1, 2, 3],
            "tensors": {"W_enc": "s.W_enc", "b_enc": "s.b_enc", "threshold": "s.threshold"}}
    b = build(tmp_path, [(comp, tensors)], [detector("d", ("s", [1.0] * 4))])
    z = Scorer(b).score_components(0, activations(3))
    np.testing.assert_array_equal(z.numpy(), np.tile([0.0, 0.0, float(b_enc[2]), 0.0], (3, 1)))


def test_score_projected_equals_score(tmp_path: Path) -> None:
    """In-worker projection, sidecar half: scores from a worker's `x · W` (and `var(x)` for
    layer_norm columns) equal the sidecar-only path; missing or misshaped inputs are refused."""
    g = torch.Generator().manual_seed(11)
    parts = [probe("p1", 1, g), probe("p3", 1, g, k=3),
             sae("relu_sae", 1, g, activation="relu", k=12),
             sae("jr_ln", 1, g, normalize="layer_norm", scale=2.0, k=10),
             probe("q", 2, g)]
    dets = [detector("a", ("p1", 1.5), bias=-0.2),
            detector("b", ("p3", rand_w(g, 3)), ("relu_sae", rand_w(g, 12))),
            detector("c", ("jr_ln", rand_w(g, 10)), ("p1", -0.7), bias=0.4),
            detector("d", ("q", 1.0))]
    sc = Scorer(build(tmp_path, parts, dets))
    x = activations(150)
    W, needs_var = sc.projection(1)
    assert needs_var and tuple(W.shape) == (D, 1 + 3 + 12 + 10)
    var = torch.var(x, dim=1, correction=0)
    np.testing.assert_allclose(sc.score_projected(1, x @ W, var), sc.score(1, x),
                               rtol=1e-5, atol=1e-6)
    W2, needs_var2 = sc.projection(2)
    assert not needs_var2 and tuple(W2.shape) == (D, 1)
    np.testing.assert_allclose(sc.score_projected(2, x @ W2), sc.score(2, x),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"var: expected \[150\]"):
        sc.score_projected(1, x @ W)
    with pytest.raises(ValueError, match=r"xw must have shape \[n_rows, 26\]"):
        sc.score_projected(1, x, var)


# ------------------------------------------------------------- per-call fast paths


@pytest.mark.parametrize("compute", COMPUTE_DTYPES, ids=["c-fp32", "c-bf16"])
@pytest.mark.parametrize("parts,epilogue", [
    ("probes", "none"), ("relu", "relu"), ("probe+jumprelu", "mask"),
    ("probe+relu", "mask"), ("jumprelu+ln", "general")])
def test_epilogue_paths_match_reference(tmp_path: Path, parts: str, epilogue: str,
                                        compute: torch.dtype) -> None:
    """Each epilogue the scorer picks per layer (none / relu / mask / general) equals the
    unfused reference; the layer compositions below select each one."""
    g = torch.Generator().manual_seed(12)
    made = {"probes": [(probe("p1", 0, g), 1), (probe("p3", 0, g, k=3), 3)],
            "relu": [(sae("s", 0, g, activation="relu", k=20), 20)],
            "probe+jumprelu": [(probe("p1", 0, g), 1), (sae("s", 0, g, k=20), 20)],
            "probe+relu": [(probe("p1", 0, g), 1),
                           (sae("s", 0, g, activation="relu", k=20), 20)],
            "jumprelu+ln": [(sae("s", 0, g, k=20, normalize="layer_norm"), 20)]}[parts]
    dets = [detector(f"d_{c['name']}", (c["name"], rand_w(g, k) if k > 1 else 1.0))
            for (c, _), k in made]
    b = build(tmp_path, [part for part, _ in made], dets)
    scorer = Scorer(b, compute)
    kern = scorer._kernel(0)
    assert kern.epilogue == epilogue
    assert (kern.fold is not None) == (epilogue == "none")  # read-out folded into the GEMM
    x = activations(200)
    assert_matches(b, x, compute)  # score(): the folded path where there is one
    # the folded scores equal the ones read out from the formed columns
    s_cols, _ = scorer.score_and_columns(0, x)
    np.testing.assert_allclose(scorer.score(0, x), s_cols, rtol=0,
                               atol=1e-6 if compute == torch.float32 else 2e-2)
    assert scorer.score(0, x[:0]).shape == (0, len(dets))


def test_mask_epilogue_is_the_formula_bit_for_bit(tmp_path: Path) -> None:
    """``Z = P · [P > θ]`` with P from the same addmm: the float-mask epilogue is exact."""
    g = torch.Generator().manual_seed(13)
    b = build(tmp_path, [probe("p", 0, g), sae("s", 0, g, k=32)],
              [detector("a", ("p", 1.0)), detector("b", ("s", rand_w(g, 32)))])
    scorer = Scorer(b)
    kern = scorer._kernel(0)
    x = activations(257)
    p = torch.addmm(kern.packed.b, x, kern.packed.W)
    want = p * (p > kern.packed.theta)
    got = scorer.score_components(0, x)
    assert torch.equal(got, want)
    assert (got[:, 1:] == 0).float().mean() > 0.2 and (got[:, 0] < 0).any()


def test_read_only_array_scores_without_warning_or_copy(tmp_path: Path) -> None:
    """A read-only numpy view of wire bytes is scored as is: no warning (torch's one
    warning is consumed at import, never by a per-call filter), not modified."""
    b = build_placeholder_bundle(tmp_path, model_name="m", d_model=D, n_layers=N_LAYERS,
                                 layers=(1,))
    s = Scorer(b)
    x = activations(40)
    wire = x.numpy().tobytes()
    view = np.frombuffer(wire, dtype=np.float32).reshape(40, D)
    assert not view.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, z = s.score_and_columns(1, view)
    np.testing.assert_array_equal(got, s.score(1, x))
    np.testing.assert_array_equal(z, s.score_components(1, x).numpy())
    assert view.tobytes() == wire


def test_outputs_are_the_callers_own(tmp_path: Path) -> None:
    """No buffer is reused between calls: arrays returned earlier keep their values."""
    b = build_placeholder_bundle(tmp_path, model_name="m", d_model=D, n_layers=N_LAYERS,
                                 layers=(1,))
    s = Scorer(b)
    x1, x2 = activations(30, seed=1), activations(30, seed=2)
    s1, z1 = s.score_and_columns(1, x1)
    keep_s, keep_z = s1.copy(), z1.copy()
    s2, z2 = s.score_and_columns(1, x2)
    s3 = s.score(1, x2)
    assert not np.shares_memory(s1, s2) and not np.shares_memory(z1, z2)
    assert not np.shares_memory(s2, s3)
    np.testing.assert_array_equal(s1, keep_s)
    np.testing.assert_array_equal(z1, keep_z)
    assert not np.array_equal(s1, s2)


def test_hook_point_spellings(tmp_path: Path) -> None:
    """A bare layer (int or numpy int) and the hook name reach the same kernel."""
    b = build_placeholder_bundle(tmp_path, model_name="m", d_model=D, n_layers=N_LAYERS,
                                 layers=(1, 3))
    s = Scorer(b)
    x = activations(10)
    want = s.score(3, x)
    np.testing.assert_array_equal(s.score("blocks.3.hook_resid_post", x), want)
    np.testing.assert_array_equal(s.score(np.int64(3), x), want)
    with pytest.raises(KeyError, match=r"blocks\.3\.hook_mlp_out has no detectors"):
        s.score("blocks.3.hook_mlp_out", x)
    with pytest.raises(ValueError):
        s.score("not a hook", x)
