"""The checked-in SAE and SAE-detector bundle load through the users' loaders."""

from __future__ import annotations

from pathlib import Path

from monitor.score import Scorer, load_bundle
from monitor.score.sae import load_saelens

ROOT = Path(__file__).resolve().parents[1] / "bundles"


def test_default_sae_loads_as_saelens_jumprelu() -> None:
    sae = load_saelens(ROOT / "sae" / "smollm2-135m-l18", d_model=576)
    assert (sae.architecture, sae.d_sae, sae.hook_name) == \
        ("jumprelu", 2048, "blocks.18.hook_resid_post")
    assert sae.layer() == 18
    assert float(sae.params["threshold"].min()) > 0  # BatchTopK's global threshold


def test_sae_detector_bundle_is_valid_and_labelled() -> None:
    b = load_bundle(ROOT / "sae-detector")
    comp = b.components["sae_l18"]
    assert comp.kind == "sae_latents" and comp.activation == "jumprelu" and comp.layer == 18
    det = b.detector("harmful_intent_sae")
    assert comp.latent_ids is not None
    assert set(det.provenance["latent_labels"]) == {str(i) for i in comp.latent_ids}
    assert Scorer(b).detectors_on(18) == ("harmful_intent_sae",)
