"""What each supported architecture's vLLM decoder layer takes and returns.

The capture op reads two places of every wrapped decoder layer (`monitor.capture.op`):

- its *input* `(hidden_states, residual)`: vLLM keeps the residual stream as a pair whose
  sum is the stream (`residual is None` at layer 0, where `hidden_states` is the scaled
  embedding). `resid_pre = hidden_states + residual` (or `hidden_states` when None).
- its *output*: for every architecture below the layer returns `(hidden, residual)` where
  `residual` is the stream after the attention block's residual add (`resid_mid`) and
  `hidden` is what the MLP block adds (`mlp_out`), so `resid_post = hidden + residual`.
  The residual add of the MLP block is deferred to the next layer's fused add-RMSNorm.

That is a fact about each model file, not a law: a layer could return a finished stream,
apply a norm after the add, scale the residual, or route tokens between layers. So the
plugin captures only on architectures listed here, each proven by a test against a
transformers forward pass (tests/test_archs.py), and refuses any other at start-up with a
message naming it (no capture rather than a silently wrong tensor).

Per family (vllm 0.32 `vllm/model_executor/models/<file>.py`):

- llama (`LlamaForCausalLM`, also SmolLM2 and Llama 3): input_layernorm → attention →
  fused add + post_attention_layernorm → MLP; returns `(mlp_out, resid_mid)`.
- mistral (`MistralForCausalLM`, `MistralDecoderLayer` ⊂ Llama's): same as llama; the
  optional `ada_rms_norm_t_cond` scales the MLP *input* only, the contract holds.
- phi3 (`Phi3ForCausalLM` = Llama model with fused qkv / gate_up weights): as llama.
- qwen2 / qwen3 (`Qwen2DecoderLayer`, `Qwen3DecoderLayer`: q/k norms inside attention):
  as llama.
- gemma2 / gemma3 (`Gemma2DecoderLayer`, `Gemma3DecoderLayer`): four norms per layer —
  input_layernorm → attention → **post_attention_layernorm** (on the attention output,
  before the add) → fused add + pre_feedforward_layernorm → MLP →
  **post_feedforward_layernorm** — and returns `(post-normed mlp_out, resid_mid)`. So the
  post-norms are inside both tensors and `hidden + residual` is still the stream;
  TransformerLens' `hook_mlp_out` for Gemma is also after the post-norm. The embeddings are
  scaled by √d_model in the model before layer 0 (HF does the same), so `resid_pre` of
  layer 0 is the scaled embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Capture contract of one model class (see the module docstring).

    Attributes:
        model_class: vLLM model class name (`type(runner.get_model()).__name__`).
        layer_classes: decoder layer classes this model is expected to hold.
        family: short family name (docs, logs, tests).
        notes: what is special about the family's layer (for logs and docs).
    """

    model_class: str
    layer_classes: tuple[str, ...]
    family: str
    notes: str = ""


#: Model classes whose decoder layers return `(mlp_out, resid_mid)`; proven in
#: tests/test_archs.py. Add an entry only together with a test there.
SUPPORTED: dict[str, ArchSpec] = {s.model_class: s for s in (
    ArchSpec("LlamaForCausalLM", ("LlamaDecoderLayer",), "llama"),
    ArchSpec("MistralForCausalLM", ("MistralDecoderLayer",), "mistral"),
    ArchSpec("Phi3ForCausalLM", ("LlamaDecoderLayer",), "phi3",
             "Llama layers with fused qkv / gate_up weights"),
    ArchSpec("Qwen2ForCausalLM", ("Qwen2DecoderLayer",), "qwen2"),
    ArchSpec("Qwen3ForCausalLM", ("Qwen3DecoderLayer",), "qwen3", "q/k RMSNorm in attention"),
    ArchSpec("Gemma2ForCausalLM", ("Gemma2DecoderLayer",), "gemma2",
             "post-attention and post-feedforward norms inside the returned pair; "
             "embeddings scaled by sqrt(d_model)"),
    ArchSpec("Gemma3ForCausalLM", ("Gemma3DecoderLayer",), "gemma3",
             "post-attention and post-feedforward norms inside the returned pair; "
             "embeddings scaled by sqrt(d_model)"),
)}


class UnsupportedArchitecture(ValueError):
    """The served model's layer output cannot be mapped to hook points."""


def check_architecture(model: nn.Module, layers: nn.ModuleList) -> ArchSpec:
    """The `ArchSpec` of a loaded vLLM model, or `UnsupportedArchitecture` naming it.

    Checks the model class and the class of every decoder layer (a supported model class
    holding an unexpected layer class — e.g. a subclass swapping layers — is refused too).
    """
    name = type(model).__name__
    spec = SUPPORTED.get(name)
    if spec is None:
        raise UnsupportedArchitecture(
            f"model class {name!r} is not one whose decoder-layer output the capture plugin "
            f"can map to hook points (supported: {sorted(SUPPORTED)}); capture is refused "
            "rather than risk streaming the wrong tensor. See monitor/capture/archs.py to add "
            "it (with a test against transformers)")
    found = sorted({type(layer).__name__ for layer in layers
                    if type(layer).__name__ != "PPMissingLayer"})
    odd = [c for c in found if c not in spec.layer_classes]
    if odd:
        raise UnsupportedArchitecture(
            f"model class {name!r} holds decoder layers of class {odd}, expected "
            f"{list(spec.layer_classes)}; capture is refused rather than risk streaming the "
            "wrong tensor")
    return spec
