"""Full-width TopK components: exact against the SAE's own full-width encode, exactly k
latents per row in float32 and bf16 compute, refusals by field, no ONNX graph, no
in-worker projection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monitor.score import Scorer, load_bundle, write_bundle
from monitor.score.bundle import BundleError
from monitor.score.kinds import Preprocessing
from monitor.score.onnx_export import export_onnx
from monitor.score.sae import SAE

D, M, K = 24, 300, 7
IDS = [5, 250, 17, 0, 123, 299]


def _sae(rescale: bool) -> SAE:
    g = torch.Generator().manual_seed(4)
    return SAE(architecture="topk", d_in=D, d_sae=M, d_out=D, hook_name="blocks.1.hook_mlp_out",
               model_name="m", k=K, rescale_acts_by_decoder_norm=rescale,
               params={"W_enc": torch.randn(D, M, generator=g),
                       "b_enc": torch.randn(M, generator=g),
                       "W_dec": torch.rand(M, D, generator=g) + 0.1,
                       "b_dec": torch.randn(D, generator=g)},
               preprocessing=Preprocessing(scale=0.5, apply_b_dec_to_input=True))


def _write(sae: SAE, root: Path) -> Path:
    comp = sae.component("sae", IDS, d_model=D)
    write_bundle(root, {
        "name": "t", "model": {"name": "m", "d_model": D, "n_layers": 4},
        "components": [{"name": "sae", "kind": "sae_latents", "layer": 1,
                        "hook_name": comp.hook_name, "activation": "topk",
                        "latent_ids": IDS,
                        "preprocessing": {"scale": 0.5, "apply_b_dec_to_input": True},
                        "tensors": {r: f"sae.{r}" for r in comp.tensors}}],
        "detectors": [{"name": "d", "token_scope": "both", "default_thresholds": {"warn": 0.5},
                       "inputs": [{"component": "sae", "latent_weights": [1.0] * len(IDS)}]}],
    }, sae.component_tensors(comp))
    return root


@pytest.mark.parametrize("rescale", [False, True])
def test_topk_subset_is_exact(tmp_path: Path, rescale: bool) -> None:
    sae = _sae(rescale)
    b = load_bundle(_write(sae, tmp_path / "b"))
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(1))
    ref = sae.encode(x)[:, IDS]
    z = Scorer(b).score_components("blocks.1.hook_mlp_out", x)
    torch.testing.assert_close(z, ref, atol=1e-4, rtol=1e-5)
    assert 0 < int((ref > 0).sum()) < ref.numel()  # the mask matters: some in, some out
    with pytest.raises(ValueError, match="TopK component needs x"):
        Scorer(b).projection("blocks.1.hook_mlp_out")
    with pytest.raises(BundleError, match="no topk components"):
        export_onnx(tmp_path / "b")


def test_topk_refusals_name_the_field(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    root = _write(_sae(False), tmp_path / "b")
    t = load_file(str(root / "weights.safetensors"))
    t["sae.W_enc"] = t["sae.W_enc"] + 1e-3  # not the full encoder's columns at latent_ids
    doc = json.loads((root / "manifest.json").read_text())
    doc.pop("files")
    with pytest.raises(BundleError, match=r"tensors\.W_enc: expected W_enc_full at latent_ids"):
        write_bundle(tmp_path / "c", doc, t)
    t["sae.W_enc"] = t["sae.W_enc_full"][:, IDS].contiguous()
    t["sae.topk_k"] = torch.tensor(float(M + 1))
    with pytest.raises(BundleError, match=r"topk_k: expected an integer in \[1, 300\]"):
        write_bundle(tmp_path / "d", doc, t)
    t["sae.topk_k"] = torch.tensor(float(K))
    doc["components"][0]["preprocessing"]["normalize"] = "layer_norm"
    with pytest.raises(BundleError, match=r"preprocessing\.normalize: expected 'none'"):
        write_bundle(tmp_path / "e", doc, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_keeps_exactly_k_per_row(tmp_path: Path, dtype: torch.dtype) -> None:
    """Exactly k latents per row in either compute dtype (bf16 rank values tie at τ often:
    with ``r ≥ τ`` as the mask, 931 of these 2000 rows kept 33–39), and the kept set is
    the plain float64 reference's top-k wherever the row has no near-tie at τ."""
    d, m, k = 256, 4096, 32
    g = torch.Generator().manual_seed(1)
    sae = SAE(architecture="topk", d_in=d, d_sae=m, d_out=d, hook_name="blocks.1.hook_resid_post",
              model_name="m", k=k, preprocessing=Preprocessing(apply_b_dec_to_input=False),
              params={"W_enc": torch.randn(d, m, generator=g) / 16,
                      "W_dec": torch.randn(m, d, generator=g),
                      "b_dec": torch.randn(d, generator=g) * 0.3, "b_enc": torch.zeros(m)})
    ids = list(range(m))
    comp = sae.component("s", ids, d_model=d)
    root = write_bundle(tmp_path / "b", {
        "name": "t", "model": {"name": "m", "d_model": d, "n_layers": 4},
        "components": [{"name": "s", "kind": "sae_latents", "layer": 1, "activation": "topk",
                        "latent_ids": ids, "preprocessing": {"apply_b_dec_to_input": False},
                        "tensors": {r: f"s.{r}" for r in comp.tensors}}],
        "detectors": [{"name": "d", "token_scope": "both", "default_thresholds": {"warn": 0.5},
                       "inputs": [{"component": "s", "latent_weights": [1.0] * m}]}],
    }, sae.component_tensors(comp))
    x = torch.randn(2000, d, generator=g) * 2
    z = Scorer(root, compute_dtype=dtype).score_components(1, x)
    kept = z != 0  # the k largest r of these rows are all positive (b_enc = 0, m ≫ k)
    assert kept.sum(dim=1).tolist() == [k] * len(x)
    # reference: float64 rank values, the top-k set by sorting (no scorer code involved)
    r = x.double() @ sae.params["W_enc"].double()
    top = r.sort(dim=1, descending=True)
    ref = torch.zeros_like(kept).scatter_(1, top.indices[:, :k], True)
    # a row's set is determined when the k-th and (k+1)-th largest are further apart than
    # twice the compute dtype's error on r (bf16 here: at most 0.044, measured: 8-bit
    # mantissas on x, W and the GEMM output); closer near-ties may go either way
    tol = 1e-4 if dtype == torch.float32 else 0.09
    gap = top.values[:, k - 1] - top.values[:, k]
    clear = gap > tol
    assert int(clear.sum()) >= 20, int(clear.sum())  # the comparison has rows
    assert torch.equal(kept[clear], ref[clear])
    # every row: no kept latent ranks below a dropped one by more than that error
    lo = r.masked_fill(~kept, float("inf")).min(dim=1).values
    hi = r.masked_fill(kept, float("-inf")).max(dim=1).values
    assert bool((lo > hi - tol).all())
