"""Token roles: which chat message (system, user, assistant, ...) each token belongs to.

One implementation for training (``probes/``) and serving (the capture plugin in vLLM's
worker): both call `RoleSegmenter.segment` on the prompt's token ids, so a probe trained
on "user tokens" reads exactly the rows the sidecar later labels user.

Convention (values equal the wire enum ``monitor.v1.TokenRole``; stored as numpy int8):

============  =====  ==================================================================
role          value  tokens
============  =====  ==================================================================
UNSPECIFIED   0      never produced here; on the wire: "derive from prompt_len" (old
                     clients)
SYSTEM        1      content of a system message (incl. a default system prompt that
                     the template inserts itself, e.g. SmolLM2's, Qwen2's)
USER          2      content of a user message
ASSISTANT     3      content of an assistant message inside the prompt (prior turns)
GENERATED     4      tokens the model sampled for this request (position >= prompt_len)
TEMPLATE      5      everything the template adds around messages: BOS, role headers
                     (``<|im_start|>user\\n``), footers (``<|im_end|>\\n``), and the
                     generation prompt (``<|im_start|>assistant\\n``)
TOOL          6      content of a tool message (where the template renders one)
OTHER         7      prompt tokens in no recognised message: raw completion prompts
                     (no chat header at all), or every prompt token when the template
                     could not be analysed (see `RoleSegmenter.fallback`)
============  =====  ==================================================================

Roles are what the *model* sees: if a user's text contains a literal
``<|im_start|>system`` that the tokenizer parses as special tokens, the model sees a
system turn and so does the segmenter.

How it works (no per-family tables): `RoleSegmenter.from_tokenizer` renders the
tokenizer's own chat template with sentinel messages, tokenizes the result exactly as
vLLM's chat endpoint does (``add_special_tokens=False``), and reads off, per role:

- the *header*: the shortest run of tokens right before a message's content that
  starts with an added (special) token and differs from every other role's header,
  e.g. ChatML ``[<|im_start|>, user, \\n]``, Llama 3 ``[<|start_header_id|>, user,
  <|end_header_id|>, \\n\\n]``, Gemma ``[<start_of_turn>, user, \\n]``, Phi-3
  ``[<|user|>, \\n]``;
- the *end token*: the first token after a message's content (``<|im_end|>``,
  ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``); it must be an added token.

`segment` then finds header occurrences in the ids (numpy, O(n) per header), and labels
``header -> TEMPLATE``, ``content (up to the end token or the next header) -> role``,
everything else ``-> TEMPLATE``. A header at the very end with no content is the
generation prompt (TEMPLATE). Trailing whitespace tokens of a header that merged with
the content's first characters (BPE) count as content.

Refused: a template whose text between two messages is non-space plain text with no
added token (Mistral v0.1: ``[INST] user [/INST]assistant</s>``, ``[INST]`` not a special
token) raises `ChatTemplateError` saying so: such markers tokenize like user text, so a
role boundary cannot be told from a user typing the marker.

Merged roles: when the template renders a role *inside* another role's turn with no
tokens of its own (Gemma 3 prepends the system text to the first user turn; Gemma 2
and Mistral refuse system messages), that role cannot be told apart from token ids and
its text is labelled as the enclosing role (`RoleSegmenter.merged` names them).

Thread safety: a `RoleSegmenter` is immutable after construction; `segment` allocates
its result and may be called from any thread.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from monitor.constants import SCOPES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CHAT_ROLES",
    "ROLE_NAMES",
    "SCOPE_WORDS",
    "ChatTemplateError",
    "RoleSegmenter",
    "TokenRole",
    "canonical_scope",
    "derive_roles",
    "role_runs",
    "roles_with_generated",
    "scope_mask",
    "scope_roles",
]


class TokenRole(enum.IntEnum):
    """Role of one token; values equal ``monitor.v1.TokenRole`` (see module docstring)."""

    UNSPECIFIED = 0
    SYSTEM = 1
    USER = 2
    ASSISTANT = 3
    GENERATED = 4
    TEMPLATE = 5
    TOOL = 6
    OTHER = 7


#: Lower-case names (policy ``scope`` spelling) of every role except UNSPECIFIED.
ROLE_NAMES: dict[str, TokenRole] = {
    r.name.lower(): r for r in TokenRole if r is not TokenRole.UNSPECIFIED
}

#: Words a policy ``scope`` may combine: the token kinds (``monitor.constants.SCOPES``:
#: ``prompt`` = every role but GENERATED, ``generated``, ``both`` = all) and the role names.
SCOPE_WORDS: tuple[str, ...] = (*SCOPES, *(n for n in ROLE_NAMES if n != "generated"))

_ALL_ROLES = frozenset(ROLE_NAMES.values())
_SCOPE_WORD_ROLES: dict[str, frozenset[TokenRole]] = {
    "prompt": _ALL_ROLES - {TokenRole.GENERATED},
    "both": _ALL_ROLES,
    **{n: frozenset({r}) for n, r in ROLE_NAMES.items()},
}


def canonical_scope(words: Sequence[str]) -> str:
    """One scope string for a list of scope words: sorted, unique, joined by ``,``
    (a single word stays itself). Raises ValueError naming an unknown word."""
    bad = [w for w in words if w not in _SCOPE_WORD_ROLES]
    if bad or not words:
        raise ValueError(f"expected one of {', '.join(SCOPE_WORDS)} or a list of them; "
                         f"found {bad[0] if bad else 'an empty list'!r}")
    return ",".join(sorted(set(words)))


@functools.lru_cache(maxsize=256)
def scope_roles(scope: str) -> frozenset[TokenRole]:
    """Roles a canonical scope covers (``"prompt"``, ``"user"``, ``"system,user"``...)."""
    out: frozenset[TokenRole] = frozenset()
    for w in scope.split(","):
        if w not in _SCOPE_WORD_ROLES:
            raise ValueError(f"scope: expected one of {', '.join(SCOPE_WORDS)} or a list of "
                             f"them; found {w!r}")
        out |= _SCOPE_WORD_ROLES[w]
    return out


@functools.lru_cache(maxsize=256)
def scope_mask(scope: str) -> np.ndarray:
    """Read-only bool lookup table ``[len(TokenRole)]``: ``scope_mask(s)[roles]`` is the
    in-scope mask of an int8 roles array (UNSPECIFIED is never in scope)."""
    t = np.zeros(len(TokenRole), dtype=bool)
    t[[int(r) for r in scope_roles(scope)]] = True
    t.flags.writeable = False
    return t


def derive_roles(generated: np.ndarray) -> np.ndarray:
    """Roles of rows known only by kind (clients before roles): OTHER / GENERATED, int8."""
    return np.where(np.asarray(generated, dtype=bool), np.int8(TokenRole.GENERATED),
                    np.int8(TokenRole.OTHER)).astype(np.int8)


#: Chat message roles the segmenter looks for, with the token role of their content.
CHAT_ROLES: dict[str, TokenRole] = {
    "system": TokenRole.SYSTEM,
    "user": TokenRole.USER,
    "assistant": TokenRole.ASSISTANT,
    "tool": TokenRole.TOOL,
}

#: Conversations rendered to learn a template (the segmenter keeps the shapes a
#: template accepts; templates raise on shapes they do not support).
_SHAPES: tuple[tuple[tuple[str, ...], bool], ...] = (
    (("system", "user", "assistant", "user", "assistant", "user"), True),
    (("user", "assistant", "user", "assistant", "user"), True),
    (("system", "user", "assistant", "user"), False),
    (("user", "assistant", "user", "assistant"), False),
    (("system", "user", "assistant", "tool", "assistant", "user"), True),
    (("user", "assistant", "tool", "assistant", "user"), True),
)


class ChatTemplateError(ValueError):
    """A chat template whose role boundaries cannot be derived from token ids.

    ``template`` names the template (``sha256:<12 hex>``), ``message`` says what was
    expected and what was found.
    """

    def __init__(self, template: str, message: str) -> None:
        super().__init__(f"chat template {template}: {message}")
        self.template = template
        self.message = message


def template_name(chat_template: str) -> str:
    """Short stable name of a template: ``sha256:`` + first 12 hex digits."""
    return "sha256:" + hashlib.sha256(chat_template.encode()).hexdigest()[:12]


def _sentinel(i: int) -> str:
    # Letters only, distinct per message, unlikely to merge with template text in BPE
    # (pre-tokenizers split letters from whitespace and punctuation).
    return f"Qzx{'abcdefghijklmnopqrstuvwxyz'[i]}sentinel"


def _plain_text_markers(prev: str, role: str, between: str) -> str:
    """The refusal for a template whose turns are delimited by plain text (no added token)."""
    return (f"expected the template text between a {prev!r} and a {role!r} message to "
            f"contain an added (special) token, found only plain text {between!r}: role "
            "markers written as ordinary text (Mistral v0.1's '[INST] ... [/INST]', no "
            "system role) tokenize exactly like user text, so a user can forge them and "
            "roles cannot be derived from token ids (the capture plugin then labels every "
            "prompt token OTHER)")


@dataclass(frozen=True)
class _Header:
    role: TokenRole
    core: tuple[int, ...]  # ids that must match, starting with an added token
    #: trailing whitespace-only id runs, longest first: header if present, else content
    tails: tuple[tuple[int, ...], ...]
    end_id: int  # first token after the content (added token)


@dataclass(frozen=True)
class RoleSegmenter:
    """Segments prompt token ids into roles for one chat template (immutable).

    Build with `from_tokenizer` (or `fallback` for a template that cannot be analysed).
    """

    template: str  # template_name() of the chat template
    headers: tuple[_Header, ...]
    merged: Mapping[str, str] = field(default_factory=dict)  # role -> enclosing role
    #: Why roles fall back to OTHER for every prompt token ("" when headers exist).
    fallback_reason: str = ""

    # ------------------------------------------------------------------ building
    @classmethod
    def fallback(cls, template: str, reason: str) -> RoleSegmenter:
        """A segmenter that labels every prompt token OTHER (unknown template)."""
        return cls(template=template, headers=(), fallback_reason=reason)

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None
    ) -> RoleSegmenter:
        """Derive role headers from ``tokenizer``'s chat template (or ``chat_template``).

        Raises:
            ChatTemplateError: no template, or role boundaries that are not token
                boundaries / not marked by added tokens (message names the template).
        """
        tpl = chat_template if chat_template is not None else tokenizer.chat_template
        if not isinstance(tpl, str) or not tpl:
            raise ChatTemplateError("<none>", "expected a chat template string on the "
                                    f"tokenizer, found {type(tpl).__name__}")
        name = template_name(tpl)
        added = frozenset(int(i) for i in tokenizer.added_tokens_decoder)
        # text between two messages that holds non-space text must contain an added token
        markers = {str(getattr(t, "content", t)) for t in tokenizer.added_tokens_decoder.values()}
        markers.discard("")

        def render(roles: Sequence[str], gen: bool) -> str | None:
            msgs = [{"role": r, "content": _sentinel(i)} for i, r in enumerate(roles)]
            try:
                out = tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=gen, chat_template=tpl)
            except Exception:  # templates raise arbitrary errors on shapes they refuse
                return None
            return out if isinstance(out, str) else None

        def ws(tid: int) -> bool:
            return str(tokenizer.decode([tid])).strip() == "" and tid not in added

        gaps_before: dict[str, list[tuple[int, ...]]] = {}
        ends_after: dict[str, set[int]] = {}
        merged: dict[str, str] = {}
        n_ok = 0
        for roles, gen in _SHAPES:
            text = render(roles, gen)
            if text is None:
                continue
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = [int(t) for t in enc["input_ids"]]
            offs = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
            found: list[tuple[int, int] | None] = []  # content chars per message
            cursor = 0
            prev: str | None = None
            for i, role in enumerate(roles):
                s = _sentinel(i)
                lo = text.find(s, cursor)
                if lo < 0:  # the template dropped this message (unsupported role)
                    found.append(None)
                    continue
                between = text[cursor:lo]
                if prev is not None and between.strip() and not any(
                        m in between for m in markers):
                    raise ChatTemplateError(name, _plain_text_markers(prev, role, between))
                cursor, prev = lo + len(s), role
                found.append((lo, cursor))
            spans: list[tuple[int, int] | None] = []
            for role, chars in zip(roles, found, strict=True):
                if chars is None:
                    spans.append(None)
                    continue
                lo, hi = chars
                t0 = next((t for t, (a, b) in enumerate(offs) if b > lo), None)
                t1 = next((t for t, (a, b) in enumerate(offs) if a >= hi), len(ids))
                if t0 is None or offs[t0][0] != lo or (t1 > 0 and offs[t1 - 1][1] != hi):
                    raise ChatTemplateError(
                        name, f"expected message content to start and end on token "
                        f"boundaries, found {role!r} content merged with template text")
                spans.append((t0, t1))
            n_ok += 1
            prev_end = 0
            prev_role: str | None = None
            for i, role in enumerate(roles):
                sp = spans[i]
                if sp is None:
                    continue
                gap = tuple(ids[prev_end:sp[0]])
                if prev_role is not None and not any(t in added for t in gap):
                    # no template token between two messages: one turn holds both
                    merged.setdefault(role, prev_role)
                else:
                    gaps_before.setdefault(role, []).append(gap)
                    if prev_role is not None:
                        ends_after.setdefault(prev_role, set()).add(gap[0])
                prev_end, prev_role = sp[1], role
            if prev_role is not None and prev_end < len(ids):
                ends_after.setdefault(prev_role, set()).add(ids[prev_end])
        if n_ok == 0:
            raise ChatTemplateError(name, "expected the template to render at least one "
                                    "system/user/assistant conversation, found it raises "
                                    "on all of them")
        for role in list(merged):
            if role in gaps_before:  # sometimes has its own turn: not merged
                del merged[role]
        cand: dict[str, list[tuple[int, ...]]] = {}
        for role, gaps in gaps_before.items():
            # suffixes starting at an added token, shortest first, common to all gaps
            g0 = gaps[0]
            cand[role] = [g0[j:] for j in range(len(g0) - 1, -1, -1)
                          if g0[j] in added and all(len(g) >= len(g0) - j
                                                    and g[len(g) - len(g0) + j:] == g0[j:]
                                                    for g in gaps)]

        def clash(h: tuple[int, ...], role: str) -> str | None:
            for r, gs in gaps_before.items():
                if r != role and any(g[len(g) - len(h):] == h for g in gs if len(g) >= len(h)):
                    return r
            return None

        # A system / tool message rendered under another role's header (Gemma 3 puts the
        # system text at the start of the first user turn) is merged into that role.
        for role in ("system", "tool"):
            if cand.get(role):
                other = clash(cand[role][0], role)
                if other in ("user", "assistant") and all(clash(h, role) for h in cand[role]):
                    merged[role] = other
                    del cand[role], gaps_before[role]
        headers: list[_Header] = []
        for role, options in cand.items():
            pick = next((h for h in options if clash(h, role) is None), None)
            if pick is None:
                raise ChatTemplateError(
                    name, f"expected a header of added tokens before {role!r} content "
                    f"that differs from other roles' headers, found gaps "
                    f"{[tokenizer.convert_ids_to_tokens(list(g)) for g in gaps_before[role]]}")
            ends = ends_after.get(role, set())
            if len(ends) != 1 or next(iter(ends)) not in added:
                raise ChatTemplateError(
                    name, f"expected one added token right after every {role!r} message, "
                    f"found {tokenizer.convert_ids_to_tokens(sorted(ends))}")
            k = len(pick)
            while k > 1 and ws(pick[k - 1]):
                k -= 1
            tail = pick[k:]
            # the same whitespace tokenized on its own (e.g. at the end of a generation
            # prompt, where no content follows) may be fewer, merged tokens
            alone = tuple(int(t) for t in tokenizer(
                tokenizer.decode(list(tail)), add_special_tokens=False)["input_ids"])
            tails = tuple(sorted({tail, alone} - {()}, key=len, reverse=True))
            headers.append(_Header(CHAT_ROLES[role], pick[:k], tails, next(iter(ends))))
        if not any(h.role is TokenRole.USER for h in headers):
            raise ChatTemplateError(name, "expected a header for 'user' messages, found "
                                    f"headers for {[h.role.name.lower() for h in headers]}")
        return cls(template=name, headers=tuple(headers), merged=dict(merged))

    # ---------------------------------------------------------------- segmenting
    def segment(self, prompt_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Role of every prompt token: int8 ``[len(prompt_ids)]`` of `TokenRole` values.

        Math: for each header ``H`` (core length ``L``) the match set is
        ``{p : ids[p:p+L] == H.core}`` (sliding-window compare at the positions where
        ``ids == H.core[0]``). Matches sorted by ``p``; message ``k`` owns
        ``[p_k + L_k (+ tail), min(next end token >= that, p_{k+1}))``.
        """
        ids = np.asarray(prompt_ids, dtype=np.int64)
        n = int(ids.shape[0])
        if not self.headers:
            return np.full(n, TokenRole.OTHER, dtype=np.int8)
        starts: list[np.ndarray] = []
        which: list[np.ndarray] = []
        for k, h in enumerate(self.headers):
            L = len(h.core)
            if n < L:
                continue
            cands = np.flatnonzero(ids[: n - L + 1] == h.core[0])
            if cands.size and L > 1:
                win = np.lib.stride_tricks.sliding_window_view(ids, L)[cands]
                cands = cands[(win == np.asarray(h.core, dtype=np.int64)).all(axis=1)]
            starts.append(cands)
            which.append(np.full(cands.size, k, dtype=np.int64))
        p = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        if p.size == 0:
            return np.full(n, TokenRole.OTHER, dtype=np.int8)
        hk = np.concatenate(which)
        order = np.argsort(p, kind="stable")
        p, hk = p[order], hk[order]
        out = np.full(n, TokenRole.TEMPLATE, dtype=np.int8)
        end_pos = {h.end_id: np.flatnonzero(ids == h.end_id) for h in self.headers}
        for m in range(p.size):
            h = self.headers[int(hk[m])]
            c0 = int(p[m]) + len(h.core)
            for tail in h.tails:
                if tuple(ids[c0:c0 + len(tail)].tolist()) == tail:
                    c0 += len(tail)
                    break
            nxt = int(p[m + 1]) if m + 1 < p.size else n
            ends = end_pos[h.end_id]
            j = int(np.searchsorted(ends, c0))
            c1 = min(nxt, int(ends[j]) if j < ends.size else n)
            if c1 > c0:
                out[c0:c1] = h.role
        return out

    def describe(self) -> str:
        """One line for logs: template name and each role's header tokens (ids)."""
        if not self.headers:
            return f"{self.template}: fallback (all prompt tokens OTHER): {self.fallback_reason}"
        parts = [f"{h.role.name.lower()}={list(h.core)}+{[list(t) for t in h.tails]}/end={h.end_id}"
                 for h in self.headers]
        merged = f" merged={dict(self.merged)}" if self.merged else ""
        return f"{self.template}: " + " ".join(parts) + merged


def roles_with_generated(prompt_roles: np.ndarray, n_generated: int) -> np.ndarray:
    """Prompt roles followed by ``n_generated`` GENERATED entries (int8)."""
    return np.concatenate(
        [prompt_roles.astype(np.int8, copy=False),
         np.full(int(n_generated), TokenRole.GENERATED, dtype=np.int8)])


def role_runs(roles: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of equal role: ``[(offset, length, role), ...]`` covering ``roles``.

    ``roles`` int8 ``[n]``; the plugin splits a request's row span at these boundaries.
    """
    n = int(roles.shape[0])
    if n == 0:
        return []
    cut = np.flatnonzero(roles[1:] != roles[:-1]) + 1
    bounds = np.concatenate(([0], cut, [n]))
    return [(int(a), int(b - a), int(roles[a])) for a, b in itertools.pairwise(bounds)]

