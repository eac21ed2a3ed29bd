"""Example sets for the default model's SAE and its harmful-intent latent detector.

Two disjoint sets of single-turn chat requests (chat-templated exactly as served, see
``probes/collect.py``), deterministic in ``seed``:

- ``sae_corpus``: what the SAE is trained on (unsupervised) and what the latent
  detector is fitted on (its labels): a shuffle of ``harmful_train`` + a slice of
  ``harmless_train`` (../shared/datasets) + the hand-written ``probes/data`` sets +
  up to ``per_v2_file`` rows of every ``../shared/datasets-v2/harmful_intent`` file
  (harmful and benign sources, so the dictionary sees both), cut to ``n_examples``
  (the CPU budget: ~45 token rows per request, ~150 rows/s on a shared 2-core box).
  Its last examples are held out of SAE training (``probes/sae_train.py``).
- ``harmful_test``: exactly the dense harmful_intent probe's short-request test set
  (``probes/recipes.py``: ``harmful_val`` + 600 of ``harmless_val``), so the latent
  detector and the dense probe are compared on the same rows.

About 20 of the ~45 rows of a typical request are SmolLM2's default system prompt
(identical in every request); they are kept: the monitor scores them too.
"""

from __future__ import annotations

import random
from pathlib import Path

from probes.collect import Activations, Collector, TokenSelection
from probes.datasets import (
    DATA_DIR,
    ChatExample,
    load_jsonl,
    load_refusal_json,
    shared_datasets_dir,
    split,
)

__all__ = ["SAE_LAYER", "collect_sets", "harmful_test", "sae_corpus"]


def _harmless_order(seed: int) -> list[ChatExample]:
    rows = load_refusal_json("harmful_intent/harmless_train.json", 0)
    order = list(range(len(rows)))
    random.Random(1000 + seed).shuffle(order)
    return [rows[i] for i in order]


def _v2_dir() -> Path | None:
    root = shared_datasets_dir()
    v2 = None if root is None else root.parent / "datasets-v2" / "harmful_intent"
    return v2 if v2 is not None and v2.is_dir() else None


def sae_corpus(n_examples: int = 1024, n_harmless: int = 1400, per_v2_file: int = 50,
               seed: int = 0) -> list[ChatExample]:
    """The SAE / latent-detector training requests (labels: 1 harmful, 0 not)."""
    out = load_refusal_json("harmful_intent/harmful_train.json", 1)
    out += _harmless_order(seed)[:n_harmless]
    for name in ("harmful_extra", "benign_extra", "benign_dangerous_train"):
        out += load_jsonl(DATA_DIR / f"{name}.jsonl")
    v2 = _v2_dir()
    if v2 is not None:
        for f in sorted(v2.glob("*.jsonl")):
            rows = [e for e in load_jsonl(f) if len(e.messages) == 1]
            out += split(rows, [1.0], seed)[0][:per_v2_file]
    return split(out, [1.0], seed)[0][:n_examples]


def harmful_test(n_test: int = 600, seed: int = 0) -> list[ChatExample]:
    """The dense probe's short-request test set (same construction as recipes.py)."""
    test_pos = load_refusal_json("harmful_intent/harmful_val.json", 1)
    test_neg_all = load_refusal_json("harmful_intent/harmless_val.json", 0)
    return test_pos + split(test_neg_all, [1.0], seed + 1)[0][:n_test]


#: The SAE's layer: the default bundle's harmful_intent probe layer (resid_post of block 18).
SAE_LAYER = 18
DEFAULT_CACHE = Path.home() / ".cache" / "safety-monitor" / "sae"


def collect_sets(collector: Collector, cache_dir: Path | None = DEFAULT_CACHE,
                 layer: int = SAE_LAYER, progress: bool = True,
                 seed: int = 0) -> dict[str, tuple[list[ChatExample], Activations]]:
    """Activations (cached per shard under ``cache_dir``) of both sets at ``layer``:
    ``{"corpus" | "test": (examples, activations)}`` (every token row)."""
    sets = {"corpus": sae_corpus(seed=seed), "test": harmful_test(seed=seed)}
    out = {}
    for name, exs in sets.items():
        out[name] = (exs, collector.collect(exs, [layer], TokenSelection("both"),
                                            cache_dir=cache_dir, progress=progress,
                                            desc=f"sae/{name}"))
    return out
