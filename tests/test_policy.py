"""Policy parsing, refusals (file, line, reason), defaults merge, bundle defaults, check."""

from __future__ import annotations

import hashlib
import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from monitor.judge.policy import (
    Aggregation,
    PolicyError,
    check_policy,
    default_policy,
    load_policy,
    parse_policy,
    run_check,
)

REPO = Path(__file__).resolve().parents[1]

GOOD = textwrap.dedent(
    """\
    version: "2025-06-01.1"
    description: test policy
    defaults:
      mode: observe
      scope: both
      aggregation: {kind: mean}
      min_tokens: 3
      thresholds: {warn: 0.5, critical: 0.9}
    detectors:
      harmful_intent:
        mode: alert
        scope: prompt
        aggregation:
          kind: ema
          half_life_tokens: 8
        thresholds:
          critical: 0.8
      deception:
        aggregation: {kind: window_max, window_tokens: 16}
        min_tokens: 0
      plain:
    """
)


@dataclass(frozen=True)
class Spec:
    name: str
    token_scope: str = "both"
    default_thresholds: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    layer: int = 0


@dataclass(frozen=True)
class FakeBundle:
    detectors: tuple


def test_happy_path_and_defaults_merge():
    p = parse_policy(GOOD, source="policy.yaml")
    assert p.version == "2025-06-01.1"
    assert p.source == "policy.yaml"
    assert p.sha256 == hashlib.sha256(GOOD.encode()).hexdigest()
    assert list(p.detectors) == ["harmful_intent", "deception", "plain"]

    h = p.detectors["harmful_intent"]
    assert (h.mode, h.scope, h.min_tokens) == ("alert", "prompt", 3)
    assert h.aggregation == Aggregation("ema", half_life_tokens=8.0)
    # thresholds replace the defaults' ladder as a whole (no warn inherited)
    assert h.thresholds == (("critical", 0.8),)
    assert h.threshold("warn") is None and h.threshold("critical") == 0.8

    d = p.detectors["deception"]
    assert (d.mode, d.scope, d.min_tokens) == ("observe", "both", 0)
    assert d.aggregation == Aggregation("window_max", window_tokens=16)
    assert d.thresholds == (("warn", 0.5), ("critical", 0.9))

    plain = p.detectors["plain"]
    assert plain.aggregation == Aggregation("mean")
    assert plain.thresholds == (("warn", 0.5), ("critical", 0.9))
    with pytest.raises(TypeError):
        p.detectors["x"] = h  # type: ignore[index]  # read-only mapping: refused at run time


def test_builtin_defaults_and_shorthand():
    p = parse_policy('version: "1"\ndetectors:\n  a:\n    aggregation: max\n'
                     "    thresholds: {warn: 0.3}\n")
    a = p.detectors["a"]
    assert (a.mode, a.scope, a.min_tokens) == ("observe", "both", 1)
    assert a.aggregation == Aggregation("max")
    assert parse_policy('version: "1"\ndetectors: {}\n').detectors == {}


def test_default_yaml_is_valid():
    p = load_policy(REPO / "policies" / "default.yaml")
    assert set(p.detectors) == {"harmful_intent", "harmful_intent_window", "deception"}
    hi = p.detectors["harmful_intent"]
    # the user's message, judged once where it ends, on the trained statistic
    assert (hi.scope, hi.aggregation.kind, hi.judge_at) == ("user", "mean_logit", "span_end")
    # beside it the same probe over the last 8 user tokens, every prefix judged
    hw = p.detectors["harmful_intent_window"]
    assert (hw.scope, hw.aggregation.kind, hw.judge_at, hw.min_tokens) == (
        "user", "window_mean_logit", "every_token", 1)
    assert hw.aggregation.window_tokens == 8
    assert p.detectors["deception"].scope == "generated"
    assert p.detectors["deception"].aggregation.kind == "ema"


def _refusal(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as ei:
        parse_policy(textwrap.dedent(text), source="policy.yaml")
    return ei.value


BASE = 'version: "1"\ndetectors:\n  harmful_intent:\n    thresholds: {warn: 0.5, critical: 0.9}\n'


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [
        (BASE + "    mode: blok\n", 5, "detectors.harmful_intent.mode",
         "expected one of observe, alert, block; found 'blok'"),
        (BASE + "    scope: response\n", 5, "detectors.harmful_intent.scope",
         "expected one of prompt, generated, both, system, user, assistant, template, tool, "
         "other or a list of them; found 'response'"),
        (BASE + "    scope:\n      - user\n      - usr\n", 7, "detectors.harmful_intent.scope",
         "found 'usr'"),
        (BASE + "    scope: []\n", 5, "detectors.harmful_intent.scope", "non-empty list"),
        (BASE + "    scope: {user: 1}\n", 5, "detectors.harmful_intent.scope",
         "found a mapping"),
        (BASE + "    threshold: 0.5\n", 5, "detectors.harmful_intent.threshold", "unknown key"),
        (BASE.replace("0.9", "1.0"), 4, "detectors.harmful_intent.thresholds.critical",
         "strictly between 0 and 1; found 1"),
        (BASE.replace("0.5", "0"), 4, "detectors.harmful_intent.thresholds.warn",
         "strictly between 0 and 1"),
        (BASE.replace("0.5", "0.95"), 4, "detectors.harmful_intent.thresholds.critical",
         "expected warn < critical"),
        (BASE.replace("0.5", '"0.5"'), 4, "detectors.harmful_intent.thresholds.warn",
         "expected a number; found '0.5'"),
        (BASE.replace("0.5", "true"), 4, "detectors.harmful_intent.thresholds.warn",
         "expected a number; found True"),
        (BASE.replace("warn:", "info:"), 4, "detectors.harmful_intent.thresholds.info",
         "unknown key; expected one of warn, critical"),
        (BASE + "    thresholds: {critical: 0.9}\n", 5, "detectors.harmful_intent.thresholds",
         "duplicate key (first defined on line 4)"),
        (BASE + "    aggregation: {kind: ema, half_life_tokens: 0}\n", 5,
         "detectors.harmful_intent.aggregation.half_life_tokens", "expected > 0; found 0"),
        (BASE + "    aggregation: {kind: ema, half_life_tokens: -2.5}\n", 5,
         "detectors.harmful_intent.aggregation.half_life_tokens", "expected > 0"),
        (BASE + "    aggregation: {kind: window_mean_logit, window_tokens: 2048}\n", 5,
         "detectors.harmful_intent.aggregation.window_tokens",
         "expected an integer in [1, 1024]; found 2048"),
        (BASE + "    aggregation: {kind: window_max, window_tokens: 0}\n", 5,
         "detectors.harmful_intent.aggregation.window_tokens", "found 0"),
        (BASE + "    aggregation: {kind: window_max, window_tokens: 2.5}\n", 5,
         "detectors.harmful_intent.aggregation.window_tokens", "expected an integer"),
        (BASE + "    aggregation:\n      kind: max\n      half_life_tokens: 4\n", 7,
         "detectors.harmful_intent.aggregation.half_life_tokens",
         "only applies to kind ema; this aggregation is kind max"),
        (BASE + "    aggregation: {kind: ema, window_tokens: 4}\n", 5,
         "detectors.harmful_intent.aggregation.window_tokens", "only applies to kind window_max"),
        (BASE + "    aggregation:\n      kind: ema\n", 6,
         "detectors.harmful_intent.aggregation.half_life_tokens", "required for kind ema"),
        (BASE + "    aggregation: {half_life_tokens: 4}\n", 5,
         "detectors.harmful_intent.aggregation.kind", "required"),
        (BASE + "    aggregation: median\n", 5, "detectors.harmful_intent.aggregation",
         "expected one of max, mean, mean_logit, ema, window_max, window_mean_logit, "
         "softmax_logit; found 'median'"),
        (BASE + "    judge_at: span_start\n", 5, "detectors.harmful_intent.judge_at",
         "expected one of every_token, span_end; found 'span_start'"),
        (BASE + "    aggregation: {kind: mean_logit, window_tokens: 4}\n", 5,
         "detectors.harmful_intent.aggregation.window_tokens",
         "only applies to kind window_max or window_mean_logit; this aggregation is kind "
         "mean_logit"),
        (BASE + "    aggregation: {kind: mean_logit, length_slope: .nan}\n", 5,
         "detectors.harmful_intent.aggregation.length_slope",
         "expected a finite number; found nan"),
        (BASE + "    aggregation: {kind: mean_logit, length_slope: fast}\n", 5,
         "detectors.harmful_intent.aggregation.length_slope", "expected a number; found 'fast'"),
        (BASE + "    aggregation: {kind: ema, half_life_tokens: 4, length_slope: 0.3}\n", 5,
         "detectors.harmful_intent.aggregation.length_slope",
         "only applies to kind mean_logit or softmax_logit; this aggregation is kind ema"),
        (BASE + "    aggregation: {kind: softmax_logit}\n", 5,
         "detectors.harmful_intent.aggregation.temperature", "required for kind softmax_logit"),
        (BASE + "    aggregation: {kind: softmax_logit, temperature: 0.1}\n", 5,
         "detectors.harmful_intent.aggregation.temperature",
         "expected a number in [0.25, 1e+06]; found 0.1"),
        (BASE + "    aggregation: {kind: softmax_logit, temperature: .inf}\n", 5,
         "detectors.harmful_intent.aggregation.temperature",
         "expected a number in [0.25, 1e+06]; found inf"),
        (BASE + "    aggregation: {kind: mean_logit, skip_tokens: 65}\n", 5,
         "detectors.harmful_intent.aggregation.skip_tokens",
         "expected an integer in [0, 64]; found 65"),
        (BASE + "    aggregation: {kind: mean_logit, skip_tokens: 2.5}\n", 5,
         "detectors.harmful_intent.aggregation.skip_tokens", "expected an integer"),
        (BASE + "    aggregation: {kind: mean, skip_tokens: 2}\n", 5,
         "detectors.harmful_intent.aggregation.skip_tokens",
         "only applies to kind mean_logit; this aggregation is kind mean"),
        (BASE + "    aggregation: {kind: mean_logit, temperature: 2}\n", 5,
         "detectors.harmful_intent.aggregation.temperature",
         "only applies to kind softmax_logit; this aggregation is kind mean_logit"),
        (BASE + "    min_tokens: -1\n", 5, "detectors.harmful_intent.min_tokens",
         "expected an integer >= 0; found -1"),
        (BASE + "    min_tokens: [1]\n", 5, "detectors.harmful_intent.min_tokens",
         "expected an integer; found a list"),
        ('version: 3\ndetectors: {}\n', 1, "version", "expected a string (quote it); found 3"),
        ('detectors: {}\n', 1, "version", "required"),
        ('version: "1"\n', 1, "detectors", "required"),
        ('version: "1"\ndetectors:\n', 2, "detectors", "found null"),
        ('version: "1"\ndetectors: {}\nextra: 1\n', 3, "extra", "unknown key"),
        ('version: "1"\nversion: "2"\ndetectors: {}\n', 2, "version", "duplicate key"),
        ('version: "1"\ndetectors:\n  a:\n    mode: alert\n', 3, "detectors.a.thresholds",
         "required (set them on the detector or in defaults)"),
        ('version: "1"\ndefaults:\n  mode: loud\ndetectors: {}\n', 3, "defaults.mode",
         "expected one of observe, alert, block; found 'loud'"),
        ('version: "1"\ndefaults:\n  color: red\ndetectors: {}\n', 3, "defaults.color",
         "unknown key"),
        ('version: "1"\ndetectors:\n  a: [1, 2]\n', 3, "detectors.a",
         "expected a mapping; found a list"),
        ('- just\n- a list\n', 1, "", "expected a mapping; found a list"),
        ('', 1, "", "empty policy"),
        ('version: "1"\ndetectors: {}\nenforcement: {fail_mode: ajar}\n', 3,
         "enforcement.fail_mode", "expected one of open, closed; found 'ajar'"),
        ('version: "1"\ndetectors: {}\nenforcement:\n  max_behind_frames: -3\n', 4,
         "enforcement.max_behind_frames", "expected an integer >= 0; found -3"),
        ('version: "1"\ndetectors: {}\nenforcement: {prompt_hold_ms: 60001}\n', 3,
         "enforcement.prompt_hold_ms", "expected an integer in [0, 60000]; found 60001"),
        ('version: "1"\ndetectors: {}\nenforcement: {holdback_tokens: -1}\n', 3,
         "enforcement.holdback_tokens", "expected an integer in [0, 4096]; found -1"),
        ('version: "1"\ndetectors: {}\nenforcement: {prompt_hold_ms: 0, holdback_tokens: 4}\n',
         3, "enforcement.holdback_tokens", "needs prompt_hold_ms > 0"),
        ('version: "1"\ndetectors: {}\nenforcement: {fail: open}\n', 3,
         "enforcement.fail", "unknown key"),
    ],
)
def test_refusals_name_file_line_field_reason(text, line, field, fragment):
    err = _refusal(text)
    assert err.file == "policy.yaml"
    assert err.line == line, str(err)
    assert err.field == field, str(err)
    assert fragment in err.reason, str(err)
    assert str(err).startswith(f"policy.yaml:{line}: ")
    assert isinstance(err, ValueError)


def test_error_string_format_matches_spec():
    err = _refusal(BASE + "    mode: blok\n")
    assert str(err) == (
        "policy.yaml:5: detectors.harmful_intent.mode: expected one of observe, alert, "
        "block; found 'blok'"
    )


def test_role_scopes() -> None:
    """A scope is a word or a list of words; lists are stored sorted, comma-joined."""
    text = ('version: "r"\ndefaults:\n  scope: [user, system, user]\n'
            "  thresholds: {warn: 0.5, critical: 0.9}\n"
            "detectors:\n  a:\n  b:\n    scope: user\n  c:\n    scope: [generated]\n"
            "  d:\n    scope: [assistant, prompt]\n")
    p = parse_policy(text)
    assert {n: d.scope for n, d in p.detectors.items()} == {
        "a": "system,user", "b": "user", "c": "generated", "d": "assistant,prompt"}


def test_yaml_syntax_error_has_line():
    err = _refusal('version: "1"\ndetectors:\n  a:\n    thresholds: {warn: 0.5\n    mode: x\n')
    assert err.field == ""
    assert "YAML syntax error" in err.reason
    assert err.line >= 4
    err = _refusal('version: "1"\ndetectors:\n  a: b: c\n')
    assert err.line == 3 and "YAML syntax error" in err.reason


@pytest.mark.parametrize("text,line,field,fragment", [
    ("!foo bar\n", 1, "", "tag '!foo'"),  # the fuzzer's find: an unknown tag, root not a mapping
    ('version: "v"\ndetectors:\n  !weird k: 1\n', 3, "detectors", "tag '!weird'"),
    ("version: !!timestamp 2020-13-45\ndetectors: {}\n", 1, "", "month must be in 1..12"),
])
def test_unconstructible_scalars_are_policy_errors(text, line, field, fragment):
    """A scalar SafeLoader cannot construct is a PolicyError at its line, not a raw yaml
    / ValueError escaping the parser (tests/fuzz_corpus/policy/ keeps the fuzzer's input)."""
    with pytest.raises(PolicyError) as ei:
        parse_policy(text, "p.yaml")
    assert (ei.value.line, ei.value.field) == (line, field)
    assert "unreadable value" in ei.value.reason and fragment in ei.value.reason


def test_load_policy_errors_name_the_path(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(BASE + "    mode: blok\n")
    with pytest.raises(PolicyError) as ei:
        load_policy(f)
    assert ei.value.file == str(f) and ei.value.line == 5
    f.write_bytes(b'version: "1"\ndetectors: {}\n# \xff\n')
    with pytest.raises(PolicyError, match="UTF-8") as ei:
        load_policy(f)
    assert ei.value.line == 3
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_default_policy_from_bundle_specs():
    specs = [
        Spec("harmful_intent", "prompt", {"warn": 0.5, "critical": 0.9}, {"fpr_0.01": 0.62}),
        Spec("calibrated_only", "generated", {}, {"fpr_0.01": 0.4, "fpr_0.001": 0.7}),
        Spec("nothing", "both"),
    ]
    p = default_policy(specs)
    assert set(p.detectors) == {"harmful_intent", "calibrated_only"}
    h = p.detectors["harmful_intent"]
    assert (h.mode, h.scope, h.aggregation.kind) == ("alert", "prompt", "max")
    assert h.thresholds == (("warn", 0.5), ("critical", 0.9))
    c = p.detectors["calibrated_only"]
    assert (c.mode, c.scope) == ("observe", "generated")
    assert c.thresholds == (("warn", 0.4), ("critical", 0.7))
    assert len(p.sha256) == 64


def test_check_policy_reports_errors_not_judged_and_low_thresholds():
    bundle = FakeBundle(
        (
            Spec("harmful_intent", "prompt", {"warn": 0.6}, {"fpr_0.01": 0.62}),
            Spec("deception", "generated", {"warn": 0.5}, {"fpr_0.01": 0.3}),
            Spec("unjudged", "both"),
        )
    )
    p = parse_policy(
        'version: "1"\ndetectors:\n'
        "  harmful_intent: {scope: prompt, mode: block, thresholds: {warn: 0.3, critical: 0.6}}\n"
        "  deception: {scope: both, thresholds: {warn: 0.3}}\n"
        "  typo_detector: {thresholds: {warn: 0.5}}\n"
    )
    problems = check_policy(p, bundle)
    errors = [x for x in problems if x.startswith("error:")]
    assert len(errors) == 1 and "typo_detector" in errors[0] and "not in the bundle" in errors[0]
    assert any("unjudged" in x and "not judged" in x for x in problems)
    low = [x for x in problems if "far below" in x]
    # warn 0.3 < 0.62 - 0.05 is flagged; critical 0.6 is within the slack; deception ok
    assert len(low) == 1 and "harmful_intent.thresholds.warn" in low[0]
    assert all(x.startswith("warning:") for x in low)
    assert any("deception.scope" in x and x.startswith("warning:") for x in problems)
    assert any("mode: block" in x for x in problems)
    clean = check_policy(default_policy(bundle.detectors), bundle)
    assert not [x for x in clean if x.startswith(("error:", "warning:"))]


def test_run_check_exit_codes(tmp_path, monkeypatch):
    import monitor.score.bundle as bundle_module

    bundle = FakeBundle((Spec("harmful_intent", "prompt", {"warn": 0.5}, {}),))
    # run_check imports load_bundle at call time, so patching the attribute is enough
    monkeypatch.setattr(bundle_module, "load_bundle", lambda path, **kw: bundle)
    good = tmp_path / "good.yaml"
    good.write_text('version: "1"\ndetectors:\n  harmful_intent: {scope: prompt, '
                    "thresholds: {warn: 0.5}}\n")
    out = io.StringIO()
    assert run_check(good, "b", out=out) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text('version: "1"\ndetectors:\n  other: {thresholds: {warn: 0.5}}\n')
    out = io.StringIO()
    assert run_check(bad, "b", out=out) == 1 and "other" in out.getvalue()
    broken = tmp_path / "broken.yaml"
    broken.write_text('version: "1"\ndetectors:\n  other: {mode: x}\n')
    out = io.StringIO()
    assert run_check(broken, "b", out=out) == 1
    assert f"{broken}:3: detectors.other.mode" in out.getvalue()


def test_judge_at_and_mean_logit_parse_and_merge():
    p = parse_policy('version: "1"\ndefaults:\n  judge_at: span_end\n'
                     "  thresholds: {warn: 0.5}\ndetectors:\n"
                     "  a: {aggregation: mean_logit, scope: user}\n"
                     "  b: {judge_at: every_token}\n  c:\n")
    assert p.detectors["a"].judge_at == "span_end"
    assert p.detectors["a"].aggregation.kind == "mean_logit"
    assert p.detectors["b"].judge_at == "every_token"
    assert p.detectors["c"].judge_at == "span_end"
    assert parse_policy('version: "1"\ndetectors:\n  d: {thresholds: {warn: 0.5}}\n'
                        ).detectors["d"].judge_at == "every_token"


def test_mean_logit_length_slope_is_optional_and_parsed():
    p = parse_policy('version: "1"\ndefaults:\n  thresholds: {warn: 0.5}\ndetectors:\n'
                     "  a: {aggregation: {kind: mean_logit, length_slope: 0.4231}}\n"
                     "  b: {aggregation: {kind: mean_logit, length_slope: -2}}\n"
                     "  c: {aggregation: {kind: mean_logit}}\n")
    assert p.detectors["a"].aggregation == Aggregation("mean_logit", length_slope=0.4231)
    assert p.detectors["b"].aggregation.length_slope == -2.0
    assert p.detectors["c"].aggregation == Aggregation("mean_logit")
    assert p.detectors["c"].aggregation.length_slope == 0.0
    assert p.detectors["c"].aggregation.skip_tokens == 0


def test_mean_logit_skip_tokens_is_optional_and_parsed():
    p = parse_policy('version: "1"\ndefaults:\n  thresholds: {warn: 0.5}\ndetectors:\n'
                     "  a: {aggregation: {kind: mean_logit, length_slope: 0.1, skip_tokens: 4}}\n"
                     "  b: {aggregation: {kind: mean_logit, skip_tokens: 0}}\n")
    assert p.detectors["a"].aggregation == Aggregation("mean_logit", length_slope=0.1,
                                                       skip_tokens=4)
    assert p.detectors["b"].aggregation == Aggregation("mean_logit")


def test_enforcement_block_parses_with_builtin_defaults() -> None:
    p = parse_policy('version: "1"\ndetectors: {}\n')
    assert (p.enforcement.fail_mode, p.enforcement.max_behind_frames) == ("open", 0)
    p = parse_policy('version: "1"\ndetectors: {}\n'
                     'enforcement: {fail_mode: closed, max_behind_frames: 64}\n')
    assert (p.enforcement.fail_mode, p.enforcement.max_behind_frames) == ("closed", 64)


def test_rewrite_thresholds_changes_only_the_numbers_and_the_version() -> None:
    import difflib

    from monitor.judge.policy import rewrite_thresholds

    text = (Path(__file__).resolve().parents[1] / "policies" / "default.yaml").read_text()
    old = parse_policy(text)
    out = rewrite_thresholds(text, {"harmful_intent": {"warn": "0.91", "critical": "0.995"},
                                    "deception": {"critical": "0.999"}}, "v-new",
                             comment="from traffic")
    new = parse_policy(out)
    assert new.version == "v-new"
    assert new.detectors["harmful_intent"].thresholds == (("warn", 0.91), ("critical", 0.995))
    assert new.detectors["deception"].threshold("critical") == 0.999
    assert new.detectors["deception"].threshold("warn") == \
        old.detectors["deception"].threshold("warn")
    for name, d in old.detectors.items():      # everything else as it was
        n = new.detectors[name]
        assert (n.mode, n.scope, n.aggregation, n.min_tokens, n.judge_at) == \
            (d.mode, d.scope, d.aggregation, d.min_tokens, d.judge_at)
    changed = [line for line in difflib.ndiff(text.splitlines(), out.splitlines())
               if line.startswith(("- ", "+ "))]
    assert len(changed) == 8                    # 4 lines out, 4 in: version and 3 values
    added = [c for c in changed if c.startswith("+ ")]
    assert added[0] == '+ version: "v-new"'
    assert all(c.endswith("  # from traffic") for c in added[1:])  # the old comments go
    # flow style: the value changes in place, the line's comment stays
    flow = 'version: "a"\ndetectors:\n  x: {thresholds: {warn: 0.5, critical: 0.9}}  # c\n'
    assert rewrite_thresholds(flow, {"x": {"warn": "0.6"}}, "b", comment="z") == \
        'version: "b"\ndetectors:\n  x: {thresholds: {warn: 0.6, critical: 0.9}}  # c\n'


def test_rewrite_thresholds_refuses_what_it_cannot_edit_in_place() -> None:
    from monitor.judge.policy import rewrite_thresholds

    inherited = ('version: "a"\ndefaults:\n  thresholds: {warn: 0.5, critical: 0.9}\n'
                 "detectors:\n  x: {mode: observe}\n")
    with pytest.raises(PolicyError, match=r"detectors\.x\.thresholds\.warn"):
        rewrite_thresholds(inherited, {"x": {"warn": "0.6"}}, "b")
    with pytest.raises(PolicyError, match=r"detectors\.nope\.thresholds\.warn"):
        rewrite_thresholds(inherited, {"nope": {"warn": "0.6"}}, "b")
    ok = 'version: "a"\ndetectors:\n  x: {thresholds: {warn: 0.5, critical: 0.9}}\n'
    with pytest.raises(PolicyError, match="warn < critical"):
        rewrite_thresholds(ok, {"x": {"warn": "0.95"}}, "b")
    with pytest.raises(PolicyError, match="comment"):
        rewrite_thresholds(ok, {"x": {"warn": "0.6"}}, "b", comment="two\nlines")


def test_rewrite_thresholds_keeps_crlf_line_endings() -> None:
    from monitor.judge.policy import rewrite_thresholds

    crlf = ('version: "a"\r\ndetectors:\r\n  x:\r\n    thresholds:\r\n'
            "      warn: 0.5   # old\r\n      critical: 0.9\r\n")
    out = rewrite_thresholds(crlf, {"x": {"warn": "0.6", "critical": "0.95"}}, "b",
                             comment="new")
    assert out == ('version: "b"\r\ndetectors:\r\n  x:\r\n    thresholds:\r\n'
                   "      warn: 0.6  # new\r\n      critical: 0.95  # new\r\n")
