"""SAE loaders and latent selection against references.

* SAELens: every architecture (standard, jumprelu, gated, topk and the transcoders) is
  built by ``sae-lens`` itself with random weights, saved with its own ``save_model``,
  loaded by ``monitor.score.sae.load_saelens``; our full encode must equal
  ``sae_lens``'s ``encode``, and the fused scorer's columns for a latent subset must
  equal the same columns of it (a bundle written from ``SAE.component``).
* Gemma Scope, Llama Scope, sparsify, OpenAI (converted): tiny hand-written weights and
  activations computed by hand in the test.
* Refusals: each names the field, what was expected and what was found.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from monitor.score import Scorer, write_bundle
from monitor.score.sae import (
    SAE,
    SAEError,
    convert_openai,
    load_gemma_scope,
    load_llama_scope,
    load_sae,
    load_saelens,
    load_sparsify,
)

sae_lens = pytest.importorskip("sae_lens")

D, M = 16, 40
IDS = [3, 0, 17, 39, 8]


def _bundle_for(sae: SAE, tmp: Path, ids: list[int]) -> Scorer:
    comp = sae.component("sae", ids, d_model=sae.d_in)
    manifest = {
        "name": "t", "model": {"name": "m", "d_model": sae.d_in, "n_layers": 8},
        "components": [{
            "name": "sae", "kind": "sae_latents", "layer": comp.layer,
            "hook_name": comp.hook_name, "activation": comp.activation,
            "latent_ids": list(ids),
            "preprocessing": {"scale": comp.preprocessing.scale,
                              "normalize": comp.preprocessing.normalize,
                              "apply_b_dec_to_input": comp.preprocessing.apply_b_dec_to_input,
                              "layer_norm_eps": comp.preprocessing.layer_norm_eps},
            "tensors": {role: f"sae.{role}" for role in comp.tensors},
        }],
        "detectors": [{"name": "d", "inputs": [{"component": "sae",
                                                  "latent_weights": [1.0] * len(ids)}],
                       "token_scope": "both", "default_thresholds": {"warn": 0.5}}],
    }
    return Scorer(write_bundle(tmp, manifest, sae.component_tensors(comp)))


def _randomise(model: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name != "threshold" else 0.2))
            if name == "threshold":
                p.abs_()


SAELENS_CASES = [
    ("standard", {"apply_b_dec_to_input": True, "normalize_activations": "none"}),
    ("standard", {"apply_b_dec_to_input": False, "normalize_activations": "layer_norm"}),
    ("jumprelu", {"apply_b_dec_to_input": True, "normalize_activations": "none"}),
    ("jumprelu", {"apply_b_dec_to_input": False, "normalize_activations": "layer_norm"}),
    ("gated", {"apply_b_dec_to_input": True, "normalize_activations": "none"}),
    ("gated", {"apply_b_dec_to_input": True, "normalize_activations": "layer_norm"}),
    ("topk", {"apply_b_dec_to_input": True, "k": 6}),
    ("topk", {"apply_b_dec_to_input": False, "k": 4, "rescale_acts_by_decoder_norm": True}),
    ("transcoder", {"apply_b_dec_to_input": False, "d_out": 12}),
    ("skip_transcoder", {"apply_b_dec_to_input": False, "d_out": D}),
    ("jumprelu_transcoder", {"apply_b_dec_to_input": False, "d_out": 12}),
    ("jumprelu_skip_transcoder", {"apply_b_dec_to_input": False, "d_out": D}),
]


@pytest.mark.parametrize("arch, extra", SAELENS_CASES,
                         ids=[f"{a}-{i}" for i, (a, _) in enumerate(SAELENS_CASES)])
def test_saelens_encode_matches_sae_lens(tmp_path: Path, arch: str, extra: dict[str, Any]
                                        ) -> None:
    cfg = {"architecture": arch, "d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu",
           "metadata": {"hook_name": "blocks.3.hook_resid_post", "model_name": "m"}, **extra}
    theirs = sae_lens.SAE.from_dict(cfg)
    _randomise(theirs, seed=len(arch) + len(extra))
    theirs.save_model(tmp_path / "sae")
    ours = load_saelens(tmp_path / "sae", d_model=D)
    assert ours.d_sae == M and ours.hook_name == "blocks.3.hook_resid_post"

    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1)) * 2.0 + 0.5
    with torch.no_grad():
        ref = theirs.encode(x)
    got = ours.encode(x)
    assert ref.shape == got.shape == (64, M)
    assert (ref > 0).float().mean() > 0.05, "degenerate test: nothing fires"
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)

    scorer = _bundle_for(ours, tmp_path / "bundle", IDS)
    z = scorer.score_components(3, x)
    torch.testing.assert_close(z, ref[:, IDS], atol=5e-5, rtol=1e-4)
    fired = ref[:, IDS] > 0
    assert torch.equal(z > 0, fired)


def test_saelens_component_keeps_its_hook_point(tmp_path: Path) -> None:
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": M, "dtype": "float32",
           "metadata": {"hook_name": "blocks.5.hook_resid_pre"}}
    theirs = sae_lens.SAE.from_dict(cfg)
    _randomise(theirs, 3)
    theirs.save_model(tmp_path / "sae")
    comp = load_saelens(tmp_path / "sae").component("c", [1, 2])
    assert (comp.layer, comp.hook_name) == (5, "blocks.5.hook_resid_pre")


# --------------------------------------------------------------------------- other formats

W_ENC = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5], [1.0, 0.0, 1.0], [-1.0, 1.0, 0.0]],
                 dtype=np.float32)  # [d=4, m=3]
B_ENC = np.array([0.1, -0.2, 0.0], dtype=np.float32)
B_DEC = np.array([0.5, 0.0, -0.5, 1.0], dtype=np.float32)
X = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]], dtype=np.float32)


def _hand(u: np.ndarray) -> np.ndarray:
    return u @ W_ENC.astype(np.float64) + B_ENC


def test_gemma_scope_npz(tmp_path: Path) -> None:
    theta = np.array([0.5, 1.0, 3.0], dtype=np.float32)
    np.savez(tmp_path / "params.npz", W_enc=W_ENC, b_enc=B_ENC, threshold=theta,
             W_dec=W_ENC.T.copy(), b_dec=B_DEC)
    sae = load_gemma_scope(tmp_path, hook_name="blocks.2.hook_resid_post", d_model=4)
    h = _hand(X.astype(np.float64))  # raw x: no b_dec subtraction
    want = np.maximum(h, 0) * (h > theta)
    # by hand: row 0 h = [1+3-4+.1, -1+4+4-.2, .5-1+3] = [0.1, 6.8, 2.5]
    np.testing.assert_allclose(h[0], [0.1, 6.8, 2.5], atol=1e-6)
    np.testing.assert_allclose(want[0], [0.0, 6.8, 0.0], atol=1e-6)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(X)).numpy(), want, atol=1e-5)
    z = _bundle_for(sae, tmp_path / "b", [1, 2]).score_components(2, torch.from_numpy(X))
    np.testing.assert_allclose(z.numpy(), want[:, [1, 2]], atol=1e-5)


def test_gemma_scope_refuses_pickled_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SAEError) as info:
        load_gemma_scope(tmp_path, hook_name="blocks.0.hook_resid_post")
    assert "plain numeric arrays" in str(info.value)


def test_llama_scope(tmp_path: Path) -> None:
    avg_norm = 4.0
    theta = 0.5
    (tmp_path / "checkpoints").mkdir()
    save_file({"encoder.weight": torch.from_numpy(W_ENC.T.copy()),
               "encoder.bias": torch.from_numpy(B_ENC),
               "decoder.weight": torch.from_numpy(W_ENC.copy()),
               "decoder.bias": torch.from_numpy(B_DEC)},
              str(tmp_path / "checkpoints" / "final.safetensors"))
    (tmp_path / "hyperparams.json").write_text(json.dumps({
        "d_model": 4, "d_sae": 3, "hook_point_in": "blocks.1.hook_resid_post",
        "hook_point_out": "blocks.1.hook_resid_post", "act_fn": "jumprelu",
        "jump_relu_threshold": theta,
        "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm}}))
    sae = load_llama_scope(tmp_path)
    assert load_sae(tmp_path).params.keys() == sae.params.keys()
    s = math.sqrt(4) / avg_norm  # 0.5
    h = _hand(s * X.astype(np.float64))
    want = np.maximum(h, 0) * (h > s * theta)
    # by hand: row 1 s·x = [.25, -.5, 0, 1]
    #   → h = [.25-1+.1, -.25-1+1-.2, .125+.25] = [-.65, -.45, .375]
    np.testing.assert_allclose(h[1], [-0.65, -0.45, 0.375], atol=1e-6)
    np.testing.assert_allclose(want[1], [0.0, 0.0, 0.375], atol=1e-6)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(X)).numpy(), want, atol=1e-5)
    z = _bundle_for(sae, tmp_path / "b", [0, 2]).score_components(1, torch.from_numpy(X))
    np.testing.assert_allclose(z.numpy(), want[:, [0, 2]], atol=1e-5)


def _sparsify_folder(root: Path, k: int, transcode: bool = False) -> Path:
    folder = root / "layers.6"
    folder.mkdir(parents=True)
    save_file({"encoder.weight": torch.from_numpy(W_ENC.T.copy()),
               "encoder.bias": torch.from_numpy(B_ENC),
               "W_dec": torch.from_numpy(W_ENC.T.copy()), "b_dec": torch.from_numpy(B_DEC)},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": 4, "num_latents": 3, "k": k,
                                                 "expansion_factor": 1,
                                                 "transcode": transcode}))
    return folder


def test_sparsify_topk_and_refusal(tmp_path: Path) -> None:
    sae = load_sae(_sparsify_folder(tmp_path, k=1))
    assert sae.hook_name == "blocks.6.hook_resid_post" and sae.k == 1
    h = _hand(X.astype(np.float64) - B_DEC)
    # row 0: x − b_dec = [.5, 2, 3.5, 3]
    #   → h = [.5+3.5-3+.1, -.5+4+3-.2, .25-1+3.5] = [1.1, 6.3, 2.75]
    np.testing.assert_allclose(h[0], [1.1, 6.3, 2.75], atol=1e-6)
    want = np.zeros_like(h)
    for i, row in enumerate(h):
        j = int(np.argmax(row))
        want[i, j] = max(row[j], 0.0)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(X)).numpy(), want, atol=1e-5)
    # the bundle's full-width TopK block gives the same answer for a latent subset
    z = _bundle_for(sae, tmp_path / "b", [2, 0]).score_components(6, torch.from_numpy(X))
    np.testing.assert_allclose(z.numpy(), want[:, [2, 0]], atol=1e-5)


def test_sparsify_transcoder_skips_b_dec(tmp_path: Path) -> None:
    sae = load_sparsify(_sparsify_folder(tmp_path, k=3, transcode=True))
    want = np.maximum(_hand(X.astype(np.float64)), 0)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(X)).numpy(), want, atol=1e-5)


@pytest.mark.parametrize("topk", [False, True])
def test_openai_state_dict_converted_without_unpickling(tmp_path: Path, topk: bool) -> None:
    sd: dict[str, Any] = {"pre_bias": torch.from_numpy(B_DEC),
                          "latent_bias": torch.from_numpy(B_ENC),
                          "encoder.weight": torch.from_numpy(W_ENC.T.copy()),
                          "decoder.weight": torch.from_numpy(W_ENC.copy()),
                          "activation": "TopK" if topk else "ReLU"}
    if topk:
        sd["activation_state_dict"] = {"k": torch.tensor(2)}
    torch.save(sd, tmp_path / "ae.pt")
    out = convert_openai(tmp_path / "ae.pt", tmp_path / "conv",
                         hook_name="blocks.0.hook_resid_post")
    sae = load_sae(out)
    x = X.astype(np.float64)
    if topk:  # LN(x) = (x − μ)/(std + 1e-5), unbiased std
        x = (x - x.mean(1, keepdims=True))
        x = x / (x.std(1, ddof=1, keepdims=True) + 1e-5)
    h = _hand(x - B_DEC)
    if topk:
        want = np.zeros_like(h)
        for i, row in enumerate(h):
            top = np.argsort(-row)[:2]
            want[i, top] = np.maximum(row[top], 0)
    else:
        want = np.maximum(h, 0)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(X)).numpy(), want, atol=1e-5)
    # and sae-lens reads the converted folder the same way
    theirs = sae_lens.SAE.load_from_disk(str(out))
    with torch.no_grad():
        np.testing.assert_allclose(theirs.encode(torch.from_numpy(X)).numpy(), want, atol=1e-5)


class _Evil:
    """Any non-tensor object: weights_only loading must refuse to build it."""


def test_openai_converter_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception) as info:
        convert_openai(tmp_path / "evil.pt", tmp_path / "out", hook_name="blocks.0.hook_x")
    assert "weights_only" in str(info.value) or "Unsupported" in str(info.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- refusals


def _saelens_folder(tmp: Path, **cfg_edits: Any) -> Path:
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": M, "dtype": "float32",
           "metadata": {"hook_name": "blocks.3.hook_resid_post"}}
    theirs = sae_lens.SAE.from_dict(cfg)
    theirs.save_model(tmp)
    doc = json.loads((tmp / "cfg.json").read_text())
    doc.update(cfg_edits)
    (tmp / "cfg.json").write_text(json.dumps(doc))
    return tmp


REFUSALS = [
    (lambda t: load_saelens(_saelens_folder(t), d_model=D + 1), "d_in",
     ["the model's d_model 17", "found 16"]),
    (lambda t: load_saelens(_saelens_folder(t, d_sae=M + 1)), "W_enc",
     ["shape [16, 41]", "found [16, 40]"]),
    (lambda t: load_saelens(_saelens_folder(t, architecture="matryoshka")), "architecture",
     ["one of [", '"matryoshka"']),
    (lambda t: load_saelens(_saelens_folder(t, normalize_activations="expected_average_only_in")),
     "normalize_activations", ["norm_scaling_factor given"]),
    (lambda t: load_saelens(_saelens_folder(t, metadata={"hook_name": "blocks.3.attn.hook_z"}))
     .component("c", [1]), "hook_name", ["blocks.L.hook_<kind>", "'blocks.3.attn.hook_z'"]),
    (lambda t: load_saelens(_saelens_folder(t)).component("c", [1, 40]), "latent_ids",
     ["indices in [0, 40)", "[40]"]),
    (lambda t: load_saelens(_saelens_folder(t)).component("c", [1, 1]), "latent_ids",
     ["distinct latent indices"]),
]


@pytest.mark.parametrize("make, field, fragments", REFUSALS,
                         ids=[f"{r[1]}-{i}" for i, r in enumerate(REFUSALS)])
def test_refusals_name_field_expected_found(tmp_path: Path, make: Any, field: str,
                                            fragments: list[str]) -> None:
    with pytest.raises(SAEError) as info:
        make(tmp_path / "sae")
    assert info.value.field == field, str(info.value)
    for frag in fragments:
        assert frag in str(info.value), str(info.value)


def test_integer_dtype_refused(tmp_path: Path) -> None:
    folder = _saelens_folder(tmp_path / "sae")
    save_file({"W_enc": torch.zeros(D, M, dtype=torch.int32), "b_enc": torch.zeros(M),
               "W_dec": torch.zeros(M, D), "b_dec": torch.zeros(D),
               "threshold": torch.zeros(M)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEError) as info:
        load_saelens(folder)
    assert info.value.field == "W_enc" and info.value.found == "I32"
