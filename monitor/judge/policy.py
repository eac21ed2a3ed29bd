"""The judging policy: per detector, thresholds, aggregation, scope and mode.

A policy is a YAML file that safety teams edit (reference: ``policies/README.md``)::

    version: "2025-06-01.1"          # required string, carried on every verdict
    description: free text           # optional
    defaults:                        # optional, applies to every detector
      mode: observe                  # observe | alert | block
      scope: both                    # prompt | generated | both | role(s), see below
      aggregation: {kind: max}       # max | mean | mean_logit | ema | window_max |
                                     # window_mean_logit | softmax_logit (mean_logit and
                                     # softmax_logit take an optional length_slope;
                                     # mean_logit an optional skip_tokens;
                                     # softmax_logit a required temperature)
      min_tokens: 1                  # no severity before this many scored tokens
      judge_at: every_token          # every_token | span_end (see below)
      thresholds: {warn: 0.5, critical: 0.9}
    detectors:                       # required mapping (may be empty)
      harmful_intent:
        scope: prompt
        aggregation: {kind: ema, half_life_tokens: 4}
        thresholds: {warn: 0.6, critical: 0.9}
    enforcement:                     # optional (``EnforcementPolicy``)
      fail_mode: open                # open | closed: new requests while the sidecar
                                     # cannot judge are served (counted) or refused (503)
      max_behind_frames: 0           # > 0: "cannot judge" also when the plugin's send
                                     # queue holds more messages than this
      prompt_hold_ms: 1000           # with a block-mode detector on prompt tokens: the
                                     # first generated token waits (at most this long)
                                     # until the prompt is judged; 0: no hold
      holdback_tokens: 4             # optional, strict streaming: with a block-mode
                                     # detector on generated tokens, streamed text never
                                     # runs more than 4 tokens ahead of the judged one

``scope`` is one word or a list of words: ``prompt`` (every prompt token), ``generated``
(the model's output), ``both``, or token roles (``monitor.roles``): ``system``, ``user``,
``assistant`` (prior assistant turns in the prompt), ``template`` (role headers, BOS,
generation prompt), ``tool``, ``other`` (prompt tokens in no chat message, e.g. raw
completion prompts or clients that send no roles), e.g. ``scope: user`` or
``scope: [system, user]``. A list is stored sorted and joined by commas
(``"system,user"``).

``judge_at`` says when the running aggregate is compared with the thresholds:
``every_token`` (built-in default) after every scored token in scope, i.e. every prefix
of the scope is judged; ``span_end`` only at the last token of each run of consecutive
in-scope tokens (``monitor.judge.aggregate.span_end_rows``): when a token out of scope
follows (e.g. the chat template after the user's message) or the request finishes. With
``scope: user`` and ``span_end`` a request is judged on the user's whole message, the
statistic a pooled probe is trained on, not on its short prefixes.

Merge rule: a detector field replaces the ``defaults`` field of the same name as a
whole (``thresholds`` and ``aggregation`` are not merged key by key: parameters belong
to one aggregation kind, and a half-specified threshold ladder is a trap). Fields set
nowhere take the built-in defaults: ``mode: observe``, ``scope: both``,
``aggregation: max``, ``min_tokens: 1``. ``thresholds`` has no built-in default.

Every refusal is a :class:`PolicyError` naming file, line, field and reason. Parsing
walks the ``yaml.compose`` node tree (SafeLoader) so that line numbers survive, and so
that duplicate keys, which ``yaml.safe_load`` silently collapses, are caught.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

import yaml

from monitor.constants import MODES, SEVERITIES
from monitor.fileio import FileRefused, read_regular_file
from monitor.judge.aggregate import (
    AGGREGATION_KINDS,
    AGGREGATIONS,
    MAX_WINDOW_TOKENS,
    Aggregation,
    param_owner,
)
from monitor.roles import SCOPE_WORDS, TokenRole, canonical_scope, scope_roles

__all__ = [
    "AGGREGATION_KINDS",
    "JUDGE_AT",
    "MAX_WINDOW_TOKENS",
    "Aggregation",
    "DetectorPolicy",
    "Policy",
    "PolicyDefaults",
    "PolicyError",
    "check_policy",
    "default_policy",
    "load_policy",
    "parse_policy",
    "rewrite_thresholds",
    "run_check",
]

#: When a detector's aggregate is judged (see the module doc): every token in scope, or
#: only at the end of each span of in-scope tokens.
JUDGE_AT: tuple[str, ...] = ("every_token", "span_end")
#: Largest policy file read (a policy is a few KB; a 10 MB one cost 2 GB of RSS).
MAX_POLICY_BYTES = 1 << 20
#: Deepest nesting of YAML collections accepted (a policy needs 4); checked on the event
#: stream before the (recursive) composer runs, so no RecursionError can escape.
MAX_POLICY_DEPTH = 16
#: ``check_policy`` warns when a threshold lies more than this far below the bundle's
#: calibrated ``fpr_0.01`` threshold (scores are probabilities, so this is absolute).
CALIBRATION_SLACK = 0.05

_VERSION_RE = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,99}$")


class PolicyError(ValueError):
    """A policy was refused.

    ``str(err)`` reads ``"<file>:<line>: <field>: <reason>"``, e.g.
    ``policy.yaml:12: detectors.harmful_intent.mode: expected one of observe, alert,
    block; found 'blok'``. ``line`` is 1-based (0: no line applies, e.g. an unreadable
    file or a refusal against the bundle); ``field`` is a dotted path ("" when the
    problem is the whole document, e.g. a YAML syntax error).
    """

    def __init__(self, file: str, line: int, field: str, reason: str) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.reason = reason
        where = f"{file}:{line}: "
        super().__init__(where + (f"{field}: {reason}" if field else reason))


@dataclass(frozen=True)
class DetectorPolicy:
    """The judged form of one detector.

    ``thresholds`` is ascending by severity and by value, e.g.
    ``(("warn", 0.5), ("critical", 0.9))``; a detector may have only one of the two.
    A severity is reached at the first judged token in scope, counted from the
    ``min_tokens``-th scored one on, where the running aggregate is ``>=`` its threshold;
    ``judge_at`` says which tokens are judged (``every_token``, or ``span_end``: the last
    token of each run of in-scope tokens).
    """

    name: str
    mode: str
    scope: str
    aggregation: Aggregation
    min_tokens: int
    thresholds: tuple[tuple[str, float], ...]
    judge_at: str = "every_token"

    def threshold(self, severity: str) -> float | None:
        """The threshold of ``severity``, or None when this detector has none for it."""
        for sev, value in self.thresholds:
            if sev == severity:
                return value
        return None


@dataclass(frozen=True)
class PolicyDefaults:
    """The ``defaults:`` block after applying built-ins (``thresholds`` may be empty)."""

    mode: str = "observe"
    scope: str = "both"
    aggregation: Aggregation = field(default_factory=lambda: Aggregation("max"))
    min_tokens: int = 1
    thresholds: tuple[tuple[str, float], ...] = ()
    judge_at: str = "every_token"


#: ``enforcement.fail_mode`` values
FAIL_MODES = ("open", "closed")


#: upper bound of ``enforcement.holdback_tokens``
MAX_HOLDBACK_TOKENS = 4096
#: upper bound of ``enforcement.prompt_hold_ms`` (a held request keeps its KV blocks)
MAX_PROMPT_HOLD_MS = 60_000


@dataclass(frozen=True)
class EnforcementPolicy:
    """The ``enforcement:`` block: what vLLM's API server does while the sidecar cannot
    judge (sent in the capture plan, applied by ``monitor.capture.gate``).

    Attributes:
        fail_mode: ``open`` (built-in default): serve new generation requests
            unmonitored and count them; ``closed``: refuse them (HTTP 503) and count them.
        max_behind_frames: the sidecar also counts as unable to judge while the capture
            plugin's send queue holds more than this many messages (it is behind);
            0 (default): only an unreachable sidecar counts.
        prompt_hold_ms: bound (ms) on how long vLLM holds a request's first generated
            token until the sidecar has judged the whole prompt (prompt-time blocking);
            it takes effect only when a detector with ``mode: block`` reads prompt tokens
            (`prompt_hold_ms`); on expiry ``fail_mode`` decides (open: release, closed:
            end the request with ``content_filter``), counted either way. 0: no hold.
            Also the bound of each hold-back wait under strict streaming.
        holdback_tokens: strict streaming (None: off): streamed text never runs more
            than this many tokens ahead of the position the sidecar has judged; takes
            effect only when a detector with ``mode: block`` reads generated tokens
            (`effective_holdback`); needs ``prompt_hold_ms > 0`` (the bound).
    """

    fail_mode: str = "open"
    max_behind_frames: int = 0
    prompt_hold_ms: int = 1000
    holdback_tokens: int | None = None


@dataclass(frozen=True)
class Policy:
    """A validated policy. ``sha256`` is of the source text (UTF-8), ``source`` its origin
    (a path or ``"<string>"``). ``detectors`` is read-only, keyed by detector name;
    ``enforcement`` the fail-open/closed settings."""

    version: str
    sha256: str
    source: str
    detectors: Mapping[str, DetectorPolicy]
    defaults: PolicyDefaults
    enforcement: EnforcementPolicy = field(default_factory=EnforcementPolicy)


# --------------------------------------------------------------------------- parsing


class _Parser:
    """Walks a composed YAML node tree, raising PolicyError with line numbers."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._loader = yaml.SafeLoader("")

    def fail(self, node: yaml.Node | None, path: str, reason: str) -> PolicyError:
        line = node.start_mark.line + 1 if node is not None else 1
        return PolicyError(self.source, line, path, reason)

    # -- primitives
    def scalar(self, node: yaml.Node, path: str = "") -> Any:
        """A scalar node's value (SafeLoader's types); a mapping or list -> its `_Kind`.

        A scalar SafeLoader cannot construct (an unknown ``!tag``, a malformed
        ``!!timestamp`` ...) is refused as a PolicyError at its line, never a raw
        ``yaml`` exception (found by the fuzzer: ``!aggregl:o requests``)."""
        if not isinstance(node, yaml.ScalarNode):
            return _Kind("a mapping" if isinstance(node, yaml.MappingNode) else "a list")
        try:
            return self._loader.construct_object(node)
        except (yaml.YAMLError, ValueError) as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise self.fail(node, path, f"unreadable value: {problem}") from None

    def mapping(
        self, node: yaml.Node, path: str, allowed: Iterable[str] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Mapping node -> {key: (key_node, value_node)}; rejects dupes and unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, path, f"expected a mapping; found {self.describe(node, path)}")
        allowed_set = None if allowed is None else tuple(allowed)
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, path)
            if not isinstance(key, str) or key == "":
                raise self.fail(
                    key_node, path, f"keys must be non-empty strings; found {key!r}"
                )
            sub = f"{path}.{key}" if path else key
            if key in out:
                first = out[key][0].start_mark.line + 1
                raise self.fail(key_node, sub, f"duplicate key (first defined on line {first})")
            if allowed_set is not None and key not in allowed_set:
                raise self.fail(
                    key_node,
                    sub,
                    f"unknown key; expected one of {', '.join(allowed_set)}",
                )
            out[key] = (key_node, value_node)
        return out

    def describe(self, node: yaml.Node, path: str = "") -> str:
        value = self.scalar(node, path)
        if isinstance(value, _Kind):
            return value.what
        return "null" if value is None else repr(value)

    def choice(self, node: yaml.Node, path: str, options: tuple[str, ...]) -> str:
        value = self.scalar(node)
        if not isinstance(value, str) or value not in options:
            raise self.fail(
                node,
                path,
                f"expected one of {', '.join(options)}; found {self.describe(node)}",
            )
        return value

    def scope(self, node: yaml.Node, path: str) -> str:
        """A scope word or a list of them (``SCOPE_WORDS``), as `canonical_scope`."""
        if isinstance(node, yaml.SequenceNode):
            items = node.value
            words = [self.scalar(n) for n in items]
        else:
            items, words = [node], [self.scalar(node)]
        for n, w in zip(items, words, strict=True):
            if not isinstance(w, str) or w not in SCOPE_WORDS:
                raise self.fail(n, path, f"expected one of {', '.join(SCOPE_WORDS)} or a list "
                                         f"of them; found {self.describe(n)}")
        if not words:
            raise self.fail(node, path, f"expected one of {', '.join(SCOPE_WORDS)} or a "
                                        "non-empty list of them; found []")
        return canonical_scope([str(w) for w in words])

    def number(self, node: yaml.Node, path: str) -> float:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(node, path, f"expected a number; found {self.describe(node)}")
        return float(value)

    def integer(self, node: yaml.Node, path: str) -> int:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(node, path, f"expected an integer; found {self.describe(node)}")
        return value

    # -- policy fields
    def aggregation(self, node: yaml.Node, path: str) -> Aggregation:
        """An aggregation from its kind and the parameters `AGGREGATIONS` defines."""
        if isinstance(node, yaml.ScalarNode):  # shorthand: `aggregation: max`
            kind = self.choice(node, path, AGGREGATION_KINDS)
            params: dict[str, tuple[yaml.Node, yaml.Node]] = {}
            kind_node: yaml.Node = node
        else:
            allowed = ("kind", *(p.name for k in AGGREGATIONS.values() for p in k.params))
            entries = self.mapping(node, path, allowed)
            if "kind" not in entries:
                raise self.fail(
                    node, f"{path}.kind", f"required; one of {', '.join(AGGREGATION_KINDS)}"
                )
            kind_node = entries["kind"][1]
            kind = self.choice(kind_node, f"{path}.kind", AGGREGATION_KINDS)
            params = {k: v for k, v in entries.items() if k != "kind"}
        spec = AGGREGATIONS[kind]
        for name, (key_node, _) in params.items():
            if spec.param(name) is None:
                raise self.fail(
                    key_node,
                    f"{path}.{name}",
                    f"only applies to kind {param_owner(name)}; this aggregation is kind {kind}",
                )
        values: dict[str, float | int] = {}
        for p in spec.params:
            if p.name not in params:
                if p.default is not None:  # optional: Aggregation fills in the default
                    continue
                raise self.fail(kind_node, f"{path}.{p.name}", f"required for kind {kind}")
            vnode = params[p.name][1]
            value: float | int = (self.integer(vnode, f"{path}.{p.name}") if p.integer
                                  else self.number(vnode, f"{path}.{p.name}"))
            problem = p.check(value)
            if problem is not None:
                raise self.fail(vnode, f"{path}.{p.name}", problem)
            values[p.name] = value
        half_life = values.get("half_life_tokens")
        window = values.get("window_tokens")
        slope = values.get("length_slope")
        tau = values.get("temperature")
        skip = values.get("skip_tokens")
        return Aggregation(kind, half_life_tokens=None if half_life is None else float(half_life),
                           window_tokens=None if window is None else int(window),
                           length_slope=None if slope is None else float(slope),
                           temperature=None if tau is None else float(tau),
                           skip_tokens=None if skip is None else int(skip))

    def thresholds(self, node: yaml.Node, path: str) -> tuple[tuple[str, float], ...]:
        entries = self.mapping(node, path, SEVERITIES)
        if not entries:
            raise self.fail(node, path, f"expected at least one of {', '.join(SEVERITIES)}")
        out: list[tuple[str, float]] = []
        for sev in SEVERITIES:
            if sev not in entries:
                continue
            vnode = entries[sev][1]
            value = self.number(vnode, f"{path}.{sev}")
            if not 0.0 < value < 1.0:
                raise self.fail(
                    vnode,
                    f"{path}.{sev}",
                    f"expected a score strictly between 0 and 1; found {value:g}",
                )
            out.append((sev, value))
        if len(out) == 2 and not out[0][1] < out[1][1]:
            raise self.fail(
                entries["critical"][1],
                f"{path}.critical",
                f"expected warn < critical; found warn {out[0][1]:g} >= critical {out[1][1]:g}",
            )
        return tuple(out)

    def fields(self, node: yaml.Node, path: str) -> dict[str, tuple[Any, yaml.Node]]:
        """Parse the detector-level fields common to ``defaults`` and each detector."""
        entries = self.mapping(
            node, path, ("mode", "scope", "aggregation", "min_tokens", "judge_at", "thresholds")
        )
        out: dict[str, tuple[Any, yaml.Node]] = {}
        for name, (key_node, vnode) in entries.items():
            sub = f"{path}.{name}"
            value: Any
            if name == "mode":
                value = self.choice(vnode, sub, MODES)
            elif name == "judge_at":
                value = self.choice(vnode, sub, JUDGE_AT)
            elif name == "scope":
                value = self.scope(vnode, sub)
            elif name == "aggregation":
                value = self.aggregation(vnode, sub)
            elif name == "min_tokens":
                value = self.integer(vnode, sub)
                if value < 0:
                    raise self.fail(vnode, sub, f"expected an integer >= 0; found {value}")
            else:
                value = self.thresholds(vnode, sub)
            out[name] = (value, key_node)
        return out


@dataclass(frozen=True)
class _Kind:
    what: str


def _check_structure(text: str, source: str) -> None:
    """Refuse nesting deeper than `MAX_POLICY_DEPTH` and anchors/aliases, from the
    (iterative) event stream: the composer and the walker below recurse per level, and
    aliases let a small file describe an exponentially large tree."""
    depth = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_POLICY_DEPTH:
                line = ev.start_mark.line + 1 if ev.start_mark else 1
                raise PolicyError(source, line, "", f"expected nesting of at most "
                                                    f"{MAX_POLICY_DEPTH} levels, found deeper")
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1
        if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None):
            line = ev.start_mark.line + 1 if ev.start_mark else 1
            raise PolicyError(source, line, "", "expected no YAML anchors or aliases "
                                                "(use `defaults`), found one")


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Parse and validate policy YAML ``text``; ``source`` names it in errors.

    Raises :class:`PolicyError` on YAML syntax errors, unknown or duplicate keys, wrong
    types, thresholds outside (0, 1), ``warn >= critical``, ``half_life_tokens <= 0``,
    ``window_tokens < 1``, a non-finite ``length_slope``, a ``temperature`` outside
    ``[0.25, 1e6]``, a ``skip_tokens`` outside ``[0, 64]``, ``min_tokens < 0``, aggregation
    parameters that do not belong to the kind, and a detector left without thresholds
    after merging ``defaults``.
    """
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    p = _Parser(source)
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(source, 0, "", f"expected at most {MAX_POLICY_BYTES} characters, "
                                         f"found {len(text)}")
    try:
        _check_structure(text, source)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = "; ".join(x for x in (e.context, e.problem) if x)
        raise PolicyError(source, line, "", f"YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise PolicyError(source, 1, "", f"YAML error: {e}") from None
    if root is None:
        raise PolicyError(source, 1, "", "empty policy; expected a mapping with version")
    top = p.mapping(root, "", ("version", "description", "defaults", "detectors",
                               "enforcement"))

    if "version" not in top:
        raise p.fail(root, "version", "required (a string, e.g. \"2025-06-01.1\")")
    vnode = top["version"][1]
    version = p.scalar(vnode)
    if not isinstance(version, str):
        raise p.fail(
            vnode, "version", f"expected a string (quote it); found {p.describe(vnode)}"
        )
    if not _VERSION_RE.match(version):
        raise p.fail(
            vnode, "version", "expected 1-100 printable ASCII characters, not starting blank"
        )
    if "description" in top:
        dnode = top["description"][1]
        if not isinstance(p.scalar(dnode), str):
            raise p.fail(dnode, "description", f"expected a string; found {p.describe(dnode)}")

    base = PolicyDefaults()
    dflt: dict[str, tuple[Any, yaml.Node]] = {}
    if "defaults" in top:
        dflt = p.fields(top["defaults"][1], "defaults")
        base = PolicyDefaults(
            **{name: value for name, (value, _) in dflt.items()}
        )

    if "detectors" not in top:
        raise p.fail(root, "detectors", "required (a mapping of detector name to settings)")
    dnode = top["detectors"][1]
    if isinstance(dnode, yaml.ScalarNode) and p.scalar(dnode) is None:
        raise p.fail(dnode, "detectors", "expected a mapping; found null (use {} for none)")
    detectors: dict[str, DetectorPolicy] = {}
    for name, (key_node, body) in p.mapping(dnode, "detectors", None).items():
        path = f"detectors.{name}"
        if any(c.isspace() for c in name):
            raise p.fail(key_node, path, "detector names must not contain whitespace")
        if isinstance(body, yaml.ScalarNode) and p.scalar(body) is None:
            own: dict[str, tuple[Any, yaml.Node]] = {}  # `name:` alone = all defaults
        else:
            own = p.fields(body, path)
        thresholds = own["thresholds"][0] if "thresholds" in own else base.thresholds
        if not thresholds:
            raise p.fail(
                key_node,
                f"{path}.thresholds",
                "required (set them on the detector or in defaults)",
            )
        detectors[name] = DetectorPolicy(
            name=name,
            mode=own["mode"][0] if "mode" in own else base.mode,
            scope=own["scope"][0] if "scope" in own else base.scope,
            aggregation=own["aggregation"][0] if "aggregation" in own else base.aggregation,
            min_tokens=own["min_tokens"][0] if "min_tokens" in own else base.min_tokens,
            thresholds=thresholds,
            judge_at=own["judge_at"][0] if "judge_at" in own else base.judge_at,
        )
    enforcement = EnforcementPolicy()
    if "enforcement" in top:
        ents = p.mapping(top["enforcement"][1], "enforcement",
                         ("fail_mode", "max_behind_frames", "prompt_hold_ms",
                          "holdback_tokens"))
        fm = (p.choice(ents["fail_mode"][1], "enforcement.fail_mode", FAIL_MODES)
              if "fail_mode" in ents else enforcement.fail_mode)
        mb = enforcement.max_behind_frames
        if "max_behind_frames" in ents:
            mb = p.integer(ents["max_behind_frames"][1], "enforcement.max_behind_frames")
            if mb < 0:
                raise p.fail(ents["max_behind_frames"][1], "enforcement.max_behind_frames",
                             f"expected an integer >= 0; found {mb}")
        hold = enforcement.prompt_hold_ms
        if "prompt_hold_ms" in ents:
            hold = p.integer(ents["prompt_hold_ms"][1], "enforcement.prompt_hold_ms")
            if not 0 <= hold <= MAX_PROMPT_HOLD_MS:
                raise p.fail(ents["prompt_hold_ms"][1], "enforcement.prompt_hold_ms",
                             f"expected an integer in [0, {MAX_PROMPT_HOLD_MS}]; found {hold}")
        holdback = None
        if "holdback_tokens" in ents:
            node = ents["holdback_tokens"][1]
            holdback = p.integer(node, "enforcement.holdback_tokens")
            if not 0 <= holdback <= MAX_HOLDBACK_TOKENS:
                raise p.fail(node, "enforcement.holdback_tokens", f"expected an integer in "
                             f"[0, {MAX_HOLDBACK_TOKENS}]; found {holdback}")
            if hold == 0:
                raise p.fail(node, "enforcement.holdback_tokens", "needs prompt_hold_ms > 0 "
                             "(the bound of every hold); found prompt_hold_ms: 0")
        enforcement = EnforcementPolicy(fail_mode=fm, max_behind_frames=mb, prompt_hold_ms=hold,
                                        holdback_tokens=holdback)
    return Policy(
        version=version,
        sha256=sha,
        source=source,
        detectors=MappingProxyType(detectors),
        defaults=base,
        enforcement=enforcement,
    )


def holding_detectors(policy: Policy) -> frozenset[str]:
    """Detectors that hold a request's first generated token (prompt-time blocking):
    ``mode: block`` with a scope that reads any prompt token (every role but
    ``generated``); empty when ``enforcement.prompt_hold_ms`` is 0."""
    if policy.enforcement.prompt_hold_ms <= 0:
        return frozenset()
    return frozenset(n for n, d in policy.detectors.items()
                     if d.mode == "block" and scope_roles(d.scope) - {TokenRole.GENERATED})


def effective_prompt_hold_ms(policy: Policy) -> int:
    """``enforcement.prompt_hold_ms`` when some detector holds (`holding_detectors`),
    else 0: a policy without a prompt-scope block detector costs no latency."""
    return policy.enforcement.prompt_hold_ms if holding_detectors(policy) else 0


def effective_holdback(policy: Policy) -> int | None:
    """``enforcement.holdback_tokens`` when a ``mode: block`` detector reads generated
    tokens (strict streaming has something to wait for), else None (off)."""
    n = policy.enforcement.holdback_tokens
    if n is None or policy.enforcement.prompt_hold_ms <= 0:
        return None
    blocks_generated = any(d.mode == "block" and TokenRole.GENERATED in scope_roles(d.scope)
                           for d in policy.detectors.values())
    return n if blocks_generated else None


def _value_node(node: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value node of ``key`` in the mapping ``node`` (None: not a mapping, or absent;
    a parsed policy has no duplicate keys)."""
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return v
    return None


def rewrite_thresholds(text: str, thresholds: Mapping[str, Mapping[str, str]],
                       version: str, source: str = "<string>", comment: str = "") -> str:
    """The policy ``text`` with ``detectors.<name>.thresholds.<severity>`` set to the given
    numbers (policy number strings, e.g. ``probes.calibrate.policy_threshold``'s, written
    as they are) and ``version`` set; every other character (comments, layout, modes,
    other fields) is left as it was, so a reviewer's diff shows only the numbers.

    ``comment`` (one line; "" none): written as the end-of-line comment of every value
    rewritten on a line of its own (block style), replacing the comment it had, which
    described the old number.

    ``text`` must parse (:func:`parse_policy`), and so must the result, whose thresholds
    must read back as the floats of the given strings; anything else raises
    :class:`PolicyError`. A severity with no value of its own under the detector in
    ``text`` (e.g. thresholds only under ``defaults``) is refused, naming it: this edits
    values, never structure."""
    parse_policy(text, source)
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if "\n" in comment:
        raise PolicyError(source, 0, "", f"comment: expected one line; found {comment!r}")
    edits: list[tuple[int, int, str]] = []

    def value_edit(node: yaml.Node, value: str) -> tuple[int, int, str]:
        start, end = node.start_mark.index, node.end_mark.index
        eol = text.find("\n", end)
        eol = len(text) if eol < 0 else eol
        if text[end:eol].endswith("\r"):  # CRLF: the line ending stays as it was
            eol -= 1
        rest = text[end:eol]
        if comment and (not rest.strip() or rest.lstrip().startswith("#")):
            return start, eol, f"{value}  # {comment}"
        return start, end, value

    vnode = _value_node(root, "version")
    if vnode is None:  # parse_policy requires it: a guard, not a branch
        raise PolicyError(source, 0, "version", "expected a version to rewrite")
    edits.append((vnode.start_mark.index, vnode.end_mark.index, json.dumps(version)))
    dets = _value_node(root, "detectors")
    for name, sevs in thresholds.items():
        thr = _value_node(_value_node(dets, name), "thresholds")
        for sev, value in sevs.items():
            node = _value_node(thr, sev)
            path = f"detectors.{name}.thresholds.{sev}"
            if not isinstance(node, yaml.ScalarNode):
                raise PolicyError(source, 0, path, "expected a value of the detector's own "
                                  "to rewrite; found none (only defaults, or no such "
                                  "detector or severity)")
            edits.append(value_edit(node, value))
    out = text
    for start, end, value in sorted(edits, reverse=True):
        out = out[:start] + value + out[end:]
    new = parse_policy(out, source)
    for name, sevs in thresholds.items():
        for sev, value in sevs.items():
            got = new.detectors[name].threshold(sev)
            if got != float(value):
                raise PolicyError(source, 0, f"detectors.{name}.thresholds.{sev}",
                                  f"expected {value} after the rewrite; found {got}")
    return out


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file (UTF-8); errors name the path as given.

    Only a regular file of at most `MAX_POLICY_BYTES` is read (a FIFO, device or
    directory is refused without blocking)."""
    source = str(path)
    try:
        data = read_regular_file(path, MAX_POLICY_BYTES)
    except FileRefused as e:
        raise PolicyError(source, 0, "", str(e)) from None
    except OSError as e:
        raise PolicyError(source, 0, "", f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PolicyError(source, line, "", "not valid UTF-8") from None
    return parse_policy(text, source=source)


# ------------------------------------------------------------------ bundle defaults


def default_policy(detector_specs: Iterable[Any], version: str = "bundle-defaults") -> Policy:
    """A policy built from a bundle's own detector defaults (used when none is given).

    Per detector spec (duck-typed: ``.name``, ``.token_scope``, ``.default_thresholds``,
    ``.calibration``):

    - with ``default_thresholds``: ``mode: alert``, those thresholds, the bundle's
      ``token_scope``. Why ``alert`` and not ``observe``: the bundle author calibrated
      these thresholds as the detector's intended operating point, and ``alert`` only
      emits verdicts, alerts and metrics; it never stops a generation (only ``block``
      would). An operator who starts the sidecar without a policy expects it to alert;
      running silently in ``observe`` would turn a forgotten policy into missed
      incidents, whereas the cost of ``alert`` is noise that a real policy tunes away.
    - without ``default_thresholds`` but with calibration ``fpr_0.01`` (and optionally
      ``fpr_0.001``): ``mode: observe`` with warn = ``fpr_0.01``, critical =
      ``fpr_0.001`` — the thresholds were measured, not chosen, so they are only
      recorded (shadow) until a team adopts them.
    - neither: the detector is not judged (``check_policy`` reports it).

    Aggregation is ``max`` with ``min_tokens: 1``: a verdict reads "some token in scope
    scored at least the threshold", the plain per-token meaning of the bundle's numbers.
    """
    detectors: dict[str, DetectorPolicy] = {}
    for spec in detector_specs:
        scope = getattr(spec, "token_scope", "both")
        if scope not in SCOPE_WORDS:
            scope = "both"
        given = dict(getattr(spec, "default_thresholds", None) or {})
        cal = dict(getattr(spec, "calibration", None) or {})
        mode = "alert"
        if not given:
            mode = "observe"
            if isinstance(cal.get("fpr_0.01"), (int, float)):
                given["warn"] = float(cal["fpr_0.01"])
            if isinstance(cal.get("fpr_0.001"), (int, float)):
                given["critical"] = float(cal["fpr_0.001"])
        ladder = tuple(
            (sev, float(given[sev]))
            for sev in SEVERITIES
            if sev in given and 0.0 < float(given[sev]) < 1.0
        )
        if len(ladder) == 2 and not ladder[0][1] < ladder[1][1]:
            ladder = ladder[1:]  # inconsistent ladder: keep the critical one only
        if not ladder:
            continue
        detectors[spec.name] = DetectorPolicy(
            name=spec.name,
            mode=mode,
            scope=scope,
            aggregation=Aggregation("max"),
            min_tokens=1,
            thresholds=ladder,
        )
    text = repr(sorted((d.name, d.mode, d.scope, d.thresholds) for d in detectors.values()))
    return Policy(
        version=version,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        source="<bundle defaults>",
        detectors=MappingProxyType(detectors),
        defaults=PolicyDefaults(),
    )


def check_policy(policy: Policy, bundle: Any) -> list[str]:
    """Problems of ``policy`` against ``bundle`` (anything with ``.detectors`` specs).

    Each line starts with ``error:``, ``warning:`` or ``note:``:

    - error: a policy detector the bundle does not have (it would never be scored);
    - note: a bundle detector the policy does not judge ("not judged");
    - warning: a threshold more than ``CALIBRATION_SLACK`` below the bundle's calibrated
      ``fpr_0.01`` threshold (expect more than 1 % of benign traffic to trip it);
    - warning: a scope that differs from the bundle's ``token_scope`` (the probe was
      trained on other tokens);
    - note: ``mode: block`` (at critical the capture plugin stops the generation; at warn
      such a detector alerts).
    """
    specs = {spec.name: spec for spec in bundle.detectors}
    problems: list[str] = []
    for name, det in policy.detectors.items():
        if name not in specs:
            known = ", ".join(sorted(specs)) or "none"
            problems.append(
                f"error: detectors.{name}: not in the bundle (bundle detectors: {known})"
            )
            continue
        spec = specs[name]
        fpr = (getattr(spec, "calibration", None) or {}).get("fpr_0.01")
        if isinstance(fpr, (int, float)) and not isinstance(fpr, bool):
            for sev, value in det.thresholds:
                if value < fpr - CALIBRATION_SLACK:
                    problems.append(
                        f"warning: detectors.{name}.thresholds.{sev}: {value:g} is far below "
                        f"the calibrated fpr_0.01 threshold {fpr:g}; expect more than 1% of "
                        f"benign traffic to reach {sev}"
                    )
        bundle_scope = getattr(spec, "token_scope", None)
        if bundle_scope in SCOPE_WORDS and det.scope != bundle_scope:
            problems.append(
                f"warning: detectors.{name}.scope: {det.scope} differs from the bundle's "
                f"token_scope {bundle_scope}"
            )
        if det.mode == "block":
            problems.append(
                f"note: detectors.{name}.mode: block stops the generation at critical "
                "(finish_reason content_filter); at warn it alerts"
            )
    for name in specs:
        if name not in policy.detectors:
            problems.append(f"note: bundle detector {name}: not judged (no policy entry)")
    return problems


def run_check(policy_path: str | Path, bundle_path: str | Path,
              out: TextIO | None = None) -> int:
    """The offline ``check`` command: validate a policy file against a bundle directory.

    Prints one line per problem to `out` (default: the current ``sys.stdout``); returns 0
    when there is no error (warnings and notes allowed), 1 on a policy error or an
    ``error:`` problem, 2 when the bundle won't load.
    """
    if out is None:
        out = sys.stdout
    try:
        policy = load_policy(policy_path)
    except PolicyError as e:
        print(f"error: {e}", file=out)
        return 1
    try:
        from monitor.score.available import installed_backend  # late: judge needs no torch
        from monitor.score.bundle import load_bundle

        # without torch (the slim image) the tensor values are not read: check needs
        # names, layers and scopes, and the scorer reads the pinned ONNX graphs
        bundle = load_bundle(bundle_path, load_tensors=installed_backend() == "torch")
    except Exception as e:
        print(f"error: bundle {bundle_path}: {e}", file=out)
        return 2
    problems = check_policy(policy, bundle)
    for line in problems:
        print(line, file=out)
    n_err = sum(line.startswith("error:") for line in problems)
    print(
        f"policy {policy.version} ({policy.sha256[:12]}): {len(policy.detectors)} detectors, "
        f"{n_err} errors, {len(problems) - n_err} warnings/notes",
        file=out,
    )
    return 1 if n_err else 0
