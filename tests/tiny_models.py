"""Tiny random-weight models of the major decoder families, written locally (no download).

Each model is a real Hugging Face folder — `config.json` from transformers' own config
class, `model.safetensors` (float32), the tokenizer of the default model and a chat
template in the family's own format — that both transformers and vLLM load. They are for
proving that capture returns the right tensor on each architecture (tests/test_archs.py)
and for sizing runs (README), never for quality.

Shapes: d_model 128, 3 decoder layers, 4 query heads / 2 KV heads of 32 dims, MLP 256,
the default model's BPE vocabulary (49152 ids) plus the family's added special tokens
(`TEMPLATE_TOKENS`, as its instruct tokenizer declares them, so its chat template's role
markers are single special tokens and the serving role segmenter reads them), vocabulary
`VOCAB` ids. Weights are drawn N(0, 0.15²) and every norm
weight is perturbed (norm gains 1 ± 0.3; Gemma's zero-centred gains 0 ± 0.3) so that a
capture that skipped a norm, a residual add or a post-norm would differ by far more than
the test tolerance.

    python tests/tiny_models.py --out /tmp/tiny            # all families
    python tests/tiny_models.py --out /tmp/tiny qwen3 gemma2
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

D_MODEL = 128
N_LAYERS = 3
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = 32
D_MLP = 256
MAX_POS = 2048
VOCAB = 49152 + 64  # BPE + room for the families' added special tokens

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
"""The families' own chat templates (as their instruct models ship them), shared with
tests/test_roles.py. The tiny models use the default model's tokenizer, so family special
tokens are plain text to it; the template's structure (role markers, generation prompt)
is the family's."""

TEMPLATE_TOKENS: dict[str, tuple[tuple[str, ...], str | None, str | None]] = {
    "qwen2": ((), None, "<|im_end|>"),  # ChatML: the default tokenizer has its markers
    "llama3": (("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"), "<|begin_of_text|>", "<|eot_id|>"),
    "gemma2": (("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>"),
    "gemma3": (("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>"),
    "phi3": (("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
             "<s>", "<|endoftext|>"),
    "mistral": (("<s>", "</s>"), "<s>", "</s>"),  # v0.1: [INST] is plain text
}
"""Template (file stem in `TEMPLATES`) → (added special tokens, bos, eos), transcribed
from the families' published `tokenizer_config.json`."""


def family_tokenizer(template: str, chat_template: str | None = None) -> Any:
    """The default model's BPE with `template`'s added special tokens, bos / eos and chat
    template (`chat_template` text overrides the file): a `PreTrainedTokenizerFast`."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    special, bos, eos = TEMPLATE_TOKENS[template]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_file(
            str(tokenizer_source() / "tokenizer.json")),
        bos_token=bos, eos_token=eos, additional_special_tokens=list(special))
    tok.chat_template = chat_template or (TEMPLATES / f"{template}.jinja").read_text()
    return tok


def _common() -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP,
                num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                num_key_value_heads=N_KV_HEADS, head_dim=HEAD_DIM,
                max_position_embeddings=MAX_POS, bos_token_id=1, eos_token_id=2,
                pad_token_id=2, tie_word_embeddings=False)


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_common(), architectures=["LlamaForCausalLM"])


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_common(), sliding_window=None, architectures=["MistralForCausalLM"])


def _qwen2() -> Any:
    from transformers import Qwen2Config

    kw = _common()
    kw.pop("head_dim")
    return Qwen2Config(**kw, architectures=["Qwen2ForCausalLM"])


def _qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_common(), architectures=["Qwen3ForCausalLM"])


def _phi3() -> Any:
    from transformers import Phi3Config

    kw = _common()
    kw.pop("head_dim")
    return Phi3Config(**kw, architectures=["Phi3ForCausalLM"])


def _gemma2() -> Any:
    from transformers import Gemma2Config

    kw = _common()
    kw["tie_word_embeddings"] = True
    # Both softcaps on. The attention cap is 2.0 (Gemma 2 ships 50.0) so that it bites on
    # these random weights: with it the last hidden state moves by 67% of its scale, so
    # rows of an engine that skipped it could not pass. (transformers' reference must run
    # `attn_implementation="eager"`: its sdpa path does not apply the cap.)
    return Gemma2Config(**kw, query_pre_attn_scalar=HEAD_DIM, sliding_window=MAX_POS,
                        attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                        hidden_activation="gelu_pytorch_tanh",
                        architectures=["Gemma2ForCausalLM"])


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    kw = _common()
    kw["tie_word_embeddings"] = True
    return Gemma3TextConfig(**kw, query_pre_attn_scalar=HEAD_DIM, sliding_window=MAX_POS,
                            layer_types=["sliding_attention", "sliding_attention",
                                         "full_attention"],
                            hidden_activation="gelu_pytorch_tanh",
                            architectures=["Gemma3ForCausalLM"])


@dataclass(frozen=True)
class Family:
    """One model family: its config factory and chat template."""

    name: str
    config: Callable[[], Any]
    chat_template: str  # file in TEMPLATES
    zero_centred_norms: bool = False  # Gemma: RMSNorm scales by (1 + w)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", _llama, "llama3.jinja"),
    Family("mistral", _mistral, "mistral.jinja"),
    Family("qwen2", _qwen2, "qwen2.jinja"),
    Family("qwen3", _qwen3, "qwen2.jinja"),
    Family("phi3", _phi3, "phi3.jinja"),
    Family("gemma2", _gemma2, "gemma2.jinja", zero_centred_norms=True),
    Family("gemma3", _gemma3, "gemma3.jinja", zero_centred_norms=True),
)}


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=D_MODEL, n_layer=2,
                      n_head=N_HEADS, bos_token_id=1, eos_token_id=2,
                      architectures=["GPT2LMHeadModel"])


UNSUPPORTED: dict[str, Family] = {"gpt2": Family("gpt2", _gpt2, "qwen2.jinja")}
"""Models vLLM serves but the capture plugin must refuse (their layers return a finished
stream, not the `(hidden, residual)` pair; see monitor/capture/archs.py)."""


def tokenizer_source() -> Path:
    """Folder whose tokenizer the tiny models reuse (the default model's)."""
    from monitor.tools.models import prepare_default_model

    return prepare_default_model()


def build_tiny_model(family: str, out: Path, *, seed: int = 0) -> Path:
    """Write the tiny `family` model to `out` (idempotent: reuses a finished folder).

    Returns:
        `out`, a folder with config.json, model.safetensors, tokenizer files and
        `chat_template.jinja` in the family's format.
    """
    import torch
    from transformers import AutoModelForCausalLM

    fam = FAMILIES.get(family) or UNSUPPORTED.get(family)
    if fam is None:
        raise ValueError(f"family: expected one of {sorted(FAMILIES | UNSUPPORTED)}, found "
                         f"{family!r}")
    out = Path(out)
    if (out / ".built").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = family_tokenizer(fam.chat_template.removesuffix(".jinja"))
    assert len(tok) <= VOCAB, (len(tok), VOCAB)
    cfg = fam.config()
    cfg.dtype = "float32"
    cfg.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else 1
    cfg.eos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_((0.0 if fam.zero_centred_norms else 1.0) + 0.3 * noise)
            else:
                p.copy_(0.15 * noise)
    model.generation_config.bos_token_id = cfg.bos_token_id
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)  # tokenizer.json with the added tokens, chat_template.jinja
    (tmp / ".built").write_text(family + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python tests/tiny_models.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="parent folder")
    ap.add_argument("families", nargs="*", default=sorted(FAMILIES))
    a = ap.parse_args(argv)
    for fam in a.families:
        print(build_tiny_model(fam, a.out / fam))


if __name__ == "__main__":
    main()
