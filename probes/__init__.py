"""Offline probe toolkit: collect activations, train, calibrate, evaluate, export bundles.

Pipeline (library and CLI ``safety-probes`` / ``python -m probes``)::

    datasets.py   labelled chat examples (shared datasets + probes/data/*.jsonl)
    collect.py    Collector: per-token residual activations at chosen layers, through the
                  same chat template and tokenisation vLLM's chat endpoint uses; cached
                  per shard (resumable)
    train.py      logistic regression (standardised), difference of means; per-token
                  training whose request-level aggregate is what the monitor serves
    calibrate.py  thresholds at target false-positive rates on benign traffic
    evaluate.py   request-level AUROC, TPR@FPR, per-category, histograms
    report.py     Markdown report + ROC / histogram PNGs
    export.py     detector bundle (monitor.score.bundle.write_bundle) + suggested policy
    recipes.py    the default detectors (harmful_intent, deception) for SmolLM2-135M

Layer convention (docs/ARCHITECTURE.md): layer ``i`` = output of decoder layer ``i`` =
HF ``output_hidden_states[i + 1]``.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
