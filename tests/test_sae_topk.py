"""Full-width TopK components: exact against the SAE's own full-width encode, refusals by
field, no ONNX graph, no in-worker projection."""

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
