"""Tests for ``gradprune.config.PruneConfig``: per-field validation, cross-field rules,
validated assignment, dict and YAML round trips."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradprune import PruneConfig
from gradprune.config import DEFAULT_MODULE_TYPES, parse_pattern

FIELDS = [
    "criterion", "criterion_options", "pattern", "reduce", "accumulate", "reduce_each_step",
    "target_sparsity", "topk", "threshold",
    "initial_sparsity", "scope", "allocation", "min_sparsity", "max_sparsity", "count_rounding", "schedule",
    "start_step", "end_step", "frequency", "include", "exclude", "module_types",
    "include_classifier", "strict_filters", "seed",
]


def test_field_list_is_complete():
    assert PruneConfig.field_names() == FIELDS


# ---------------------------------------------------------------------------------------------
# wrong types: TypeError naming the field and the type received

BAD_TYPES = [
    ("criterion", 3), ("criterion", None),
    ("criterion_options", [1]), ("criterion_options", "alpha=1"), ("criterion_options", {1: 2}),
    ("pattern", 4), ("pattern", None),
    ("reduce", 1), ("count_rounding", 1), ("count_rounding", None),
    ("target_sparsity", "0.5"), ("target_sparsity", True), ("target_sparsity", [0.5]),
    ("topk", "3"), ("topk", True), ("topk", False),
    ("threshold", "0.1"), ("threshold", True),
    ("initial_sparsity", None), ("initial_sparsity", "0"), ("initial_sparsity", False),
    ("scope", None), ("allocation", 1), ("schedule", 2),
    ("min_sparsity", "0"), ("min_sparsity", True), ("max_sparsity", None), ("max_sparsity", True),
    ("start_step", 1.0), ("start_step", True), ("start_step", "0"),
    ("end_step", 2.5), ("end_step", False),
    ("frequency", 1.0), ("frequency", True),
    ("include", 3), ("include", ["a", 1]),
    ("exclude", 3), ("exclude", [None]),
    ("module_types", None), ("module_types", ["Linear", 3]),
    ("include_classifier", 1), ("include_classifier", "yes"), ("include_classifier", None),
    ("strict_filters", 1), ("strict_filters", None),
    ("seed", 1.5), ("seed", True), ("seed", "0"), ("seed", None),
]


@pytest.mark.parametrize("name, value", BAD_TYPES, ids=[f"{n}={v!r}" for n, v in BAD_TYPES])
def test_wrong_type_raises_type_error(name, value):
    with pytest.raises(TypeError) as exc:
        PruneConfig(**{name: value})
    msg = str(exc.value)
    assert msg.startswith(name), msg
    bad = value                               # the type received: the value's, or its bad item's
    if isinstance(value, list) and name in ("include", "exclude", "module_types"):
        bad = next(x for x in value if not isinstance(x, str))
    elif isinstance(value, dict):
        bad = next(iter(value))
    assert msg.endswith(type(bad).__name__), msg


def test_type_error_message_format():
    with pytest.raises(TypeError, match=r"^start_step must be int, got str$"):
        PruneConfig(start_step="0")
    with pytest.raises(TypeError, match=r"^target_sparsity must be float, got bool$"):
        PruneConfig(target_sparsity=True)
    with pytest.raises(TypeError, match=r"^topk must be int or float, got bool$"):
        PruneConfig(topk=True)


# ---------------------------------------------------------------------------------------------
# wrong values: ValueError naming the field and the value

BAD_VALUES = [
    ("criterion", ""),
    ("pattern", "3x"), ("pattern", "0x1"), ("pattern", "4:2"), ("pattern", "2:2"), ("pattern", "row"),
    ("reduce", "median"), ("count_rounding", "ceil"), ("count_rounding", "Floor"),
    ("target_sparsity", 1.0), ("target_sparsity", -0.1), ("target_sparsity", math.nan),
    ("target_sparsity", 1),
    ("topk", 0), ("topk", -3), ("topk", 0.0), ("topk", 1.5), ("topk", -0.5), ("topk", math.nan),
    ("topk", math.inf),
    ("threshold", math.nan),
    ("initial_sparsity", 1.0), ("initial_sparsity", -0.5),
    ("scope", "globl"), ("allocation", "lamp"), ("schedule", "cubicc"),
    ("min_sparsity", 1.5), ("min_sparsity", -0.01), ("max_sparsity", 1.01), ("max_sparsity", -1),
    ("start_step", -1), ("end_step", -5), ("frequency", 0), ("frequency", -2),
    ("module_types", []),
    ("seed", -1),
]


@pytest.mark.parametrize("name, value", BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_wrong_value_raises_value_error(name, value):
    with pytest.raises(ValueError) as exc:
        PruneConfig(**{name: value})
    msg = str(exc.value)
    assert msg.startswith(name), msg
    shown = {repr(value)} | ({repr(float(value))} if isinstance(value, (int, float)) else set())
    assert any(msg.endswith(f"got {r}") for r in shown), msg


def test_value_error_message_format():
    with pytest.raises(ValueError, match=r"^scope must be one of global, local; got 'globl'$"):
        PruneConfig(scope="globl")
    with pytest.raises(ValueError, match=r"^topk must be >= 1 when an int, got 0$"):
        PruneConfig(topk=0)
    with pytest.raises(ValueError, match=r"^topk must be in \(0, 1\] when a float, got 1.5$"):
        PruneConfig(topk=1.5)
    with pytest.raises(ValueError, match=r"target_sparsity must be in \[0.0, 1.0\), got 1.0"):
        PruneConfig(target_sparsity=1.0)


def test_valid_values_and_normalisation():
    cfg = PruneConfig(target_sparsity=0, topk=None, threshold=None, include="enc.*",
                      exclude=["a", "b"], module_types=("Linear",), criterion_options=None)
    assert cfg.target_sparsity == 0.0 and isinstance(cfg.target_sparsity, float)
    assert cfg.include == ("enc.*",) and cfg.exclude == ("a", "b")
    assert cfg.module_types == ("Linear",) and cfg.criterion_options == {}
    assert PruneConfig(exclude=None).exclude == ()
    assert PruneConfig(topk=1).topk == 1 and isinstance(PruneConfig(topk=1).topk, int)
    assert PruneConfig(topk=1.0).topk == 1.0 and isinstance(PruneConfig(topk=1.0).topk, float)
    assert PruneConfig(topk=10**9).topk == 10**9
    assert PruneConfig(threshold=-3).threshold == -3.0
    with pytest.raises(ValueError, match="threshold=inf would prune every weight"):
        PruneConfig(threshold=math.inf)
    for p in ["1x1", "4x1", "2x2", "1x4", "2:4", "1:4", "channel", "kernel"]:
        assert PruneConfig(pattern=p).pattern == p
    d = PruneConfig()
    assert (d.criterion, d.pattern, d.scope, d.allocation, d.schedule) == (
        "magnitude", "1x1", "local", "uniform", "cubic")
    assert d.max_sparsity == 0.98 and d.module_types == DEFAULT_MODULE_TYPES


# ---------------------------------------------------------------------------------------------
# cross-field rules

@pytest.mark.parametrize("kw, words", [
    (dict(min_sparsity=0.5, max_sparsity=0.4), ["min_sparsity", "max_sparsity", "0.5", "0.4"]),
    (dict(start_step=10, end_step=5), ["end_step", "start_step", "10", "5"]),
    (dict(target_sparsity=0.5, topk=3), ["target_sparsity", "topk", "0.5", "3"]),
    (dict(target_sparsity=0.5, threshold=0.1), ["target_sparsity", "threshold"]),
    (dict(pattern="2:4", target_sparsity=0.6), ["target_sparsity", "2:4", "0.6"]),
    (dict(pattern="1:4", target_sparsity=0.8), ["target_sparsity", "1:4", "0.8"]),
    (dict(scope="global", allocation="er"), ["allocation", "global", "er"]),
    (dict(scope="global", allocation="erk"), ["allocation", "erk"]),
    (dict(initial_sparsity=0.6, target_sparsity=0.5), ["initial_sparsity", "0.6", "0.5"]),
    (dict(initial_sparsity=0.6, pattern="2:4"), ["initial_sparsity", "0.6", "0.5"]),
])
def test_cross_field_rules(kw, words):
    with pytest.raises(ValueError) as exc:
        PruneConfig(**kw)
    for w in words:
        assert w in str(exc.value), str(exc.value)


def test_cross_field_rules_accept_the_boundaries():
    PruneConfig(min_sparsity=0.4, max_sparsity=0.4)
    PruneConfig(start_step=5, end_step=5)
    PruneConfig(pattern="2:4", target_sparsity=0.5)
    PruneConfig(pattern="1:4", target_sparsity=0.75)
    PruneConfig(pattern="2:4", topk=3)                  # topk with N:M: no implied target
    PruneConfig(scope="local", allocation="erk")
    PruneConfig(scope="global", allocation="uniform")
    PruneConfig(initial_sparsity=0.5, target_sparsity=0.5)
    PruneConfig(topk=0.5, threshold=0.2)                # topk and threshold together are fine


def test_effective_target():
    assert PruneConfig().effective_target() is None
    assert PruneConfig(target_sparsity=0.3).effective_target() == 0.3
    assert PruneConfig(pattern="2:4").effective_target() == 0.5
    assert PruneConfig(pattern="1:4").effective_target() == 0.75
    assert PruneConfig(pattern="2:4", target_sparsity=0.25).effective_target() == 0.25
    assert PruneConfig(pattern="2:4", topk=3).effective_target() is None


# ---------------------------------------------------------------------------------------------
# validated assignment

@pytest.mark.parametrize("name, value, exc", [
    ("scope", "globl", ValueError), ("scope", 1, TypeError), ("start_step", "1", TypeError),
    ("target_sparsity", 1.0, ValueError), ("topk", 0, ValueError), ("topk", True, TypeError),
    ("seed", -1, ValueError), ("include_classifier", 0, TypeError), ("module_types", [], ValueError),
    ("min_sparsity", 0.99, ValueError),      # above max_sparsity=0.98: a cross-field rule
    ("end_step", 5, ValueError),             # below start_step=10
    ("topk", 5, ValueError),                 # target_sparsity is set
    ("allocation", "er", ValueError),        # scope is global
    ("target_sparsity", 0.1, ValueError),    # below initial_sparsity
])
def test_rejected_assignment_leaves_config_unchanged(name, value, exc):
    cfg = PruneConfig(target_sparsity=0.5, initial_sparsity=0.2, scope="global", start_step=10,
                      end_step=20)
    before = cfg.to_dict()
    with pytest.raises(exc, match=name):
        setattr(cfg, name, value)
    assert cfg.to_dict() == before
    assert cfg == PruneConfig.from_dict(before)


def test_nm_assignment_checks_target():
    cfg = PruneConfig(pattern="2:4")
    with pytest.raises(ValueError, match="target_sparsity"):
        cfg.target_sparsity = 0.6
    assert cfg.target_sparsity is None
    cfg.target_sparsity = 0.5
    assert cfg.target_sparsity == 0.5
    with pytest.raises(ValueError, match="target_sparsity"):
        cfg.pattern = "3:4"                                 # 3 kept of 4: at most 0.25
    assert cfg.pattern == "2:4"


def test_accepted_assignment_is_normalised():
    cfg = PruneConfig()
    cfg.target_sparsity = 0
    assert cfg.target_sparsity == 0.0 and isinstance(cfg.target_sparsity, float)
    cfg.include = "encoder.*"
    assert cfg.include == ("encoder.*",)
    cfg.criterion_options = None
    assert cfg.criterion_options == {}
    cfg.scope = "global"
    assert cfg.scope == "global"
    with pytest.raises(ValueError, match="allocation"):
        cfg.allocation = "erk"
    assert cfg.allocation == "uniform"


def test_replace_is_validated():
    cfg = PruneConfig(target_sparsity=0.5)
    assert cfg.replace(target_sparsity=0.7).target_sparsity == 0.7
    assert cfg.target_sparsity == 0.5
    with pytest.raises(ValueError, match="target_sparsity"):
        cfg.replace(target_sparsity=2.0)
    with pytest.raises(ValueError, match="topk"):
        cfg.replace(topk=3)


# ---------------------------------------------------------------------------------------------
# from_dict / to_dict / YAML

def test_from_dict_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ValueError) as exc:
        PruneConfig.from_dict({"target_sparity": 0.5, "sheme": "x", "scope": "local"})
    msg = str(exc.value)
    assert "'sheme'" in msg and "'target_sparity'" in msg and "'scope'" not in msg.split(";")[0]
    for f in FIELDS:
        assert f in msg.split("valid keys:")[1]
    with pytest.raises(TypeError, match="dict, got list"):
        PruneConfig.from_dict([("scope", "local")])


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="scope"):
        PruneConfig.from_dict({"scope": "globl"})
    with pytest.raises(TypeError, match="seed must be int, got float"):
        PruneConfig.from_dict({"seed": 1.0})


@st.composite
def configs(draw):
    kw = {}
    kw["criterion"] = draw(st.sampled_from(["magnitude", "snip", "snip_momentum", "my_crit"]))
    if draw(st.booleans()):
        kw["criterion_options"] = draw(st.dictionaries(
            st.sampled_from(["alpha", "beta", "seed"]),
            st.one_of(st.floats(0, 1), st.integers(0, 5)), max_size=2))
    kw["pattern"] = draw(st.sampled_from(["1x1", "4x1", "2x2", "2:4", "1:4", "channel", "kernel"]))
    kw["reduce"] = draw(st.sampled_from(["mean", "sum", "max"]))
    sel = draw(st.sampled_from(["target", "topk_int", "topk_float", "threshold", "both", "none"]))
    if sel == "target":
        kw["target_sparsity"] = draw(st.floats(0.0, 0.99))
    if sel in ("topk_int", "both"):
        kw["topk"] = draw(st.integers(1, 10**6))
    if sel == "topk_float":
        kw["topk"] = draw(st.floats(0.001, 1.0))
    if sel in ("threshold", "both"):
        kw["threshold"] = draw(st.floats(-1e6, 1e6))
    kw["initial_sparsity"] = draw(st.floats(0.0, 0.3))
    kw["scope"] = draw(st.sampled_from(["local", "global"]))
    kw["allocation"] = draw(st.sampled_from(["uniform", "er", "erk"]))
    lo = draw(st.floats(0.0, 0.5))
    kw["min_sparsity"], kw["max_sparsity"] = lo, draw(st.floats(lo, 1.0))
    kw["schedule"] = draw(st.sampled_from(["oneshot", "cubic", "exp", "linear", "cos", "cube"]))
    kw["start_step"] = draw(st.integers(0, 100))
    kw["end_step"] = kw["start_step"] + draw(st.integers(0, 1000))
    kw["frequency"] = draw(st.integers(1, 50))
    names = st.lists(st.sampled_from(["enc.*", "*.weight", "head", "0.weight"]), max_size=3)
    kw["include"] = draw(st.one_of(st.none(), names))
    kw["exclude"] = draw(names)
    kw["module_types"] = draw(st.lists(st.sampled_from(["Linear", "Conv2d", "MyLayer"]),
                                       min_size=1, max_size=3))
    kw["include_classifier"] = draw(st.booleans())
    kw["seed"] = draw(st.integers(0, 2**31))
    try:
        return PruneConfig(**kw)
    except ValueError:   # a cross-field rule; those are tested on their own
        assume(False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cfg=configs())
def test_dict_and_yaml_round_trip(cfg):
    d = cfg.to_dict()
    assert list(d) == FIELDS
    json.dumps(d)                                               # plain values only
    assert not any(isinstance(v, tuple) for v in d.values())
    back = PruneConfig.from_dict(d)
    assert back == cfg and back.to_dict() == d
    assert type(back.topk) is type(cfg.topk)                    # int topk != float topk
    text = cfg.to_yaml()
    again = PruneConfig.from_yaml(text)
    assert again == cfg and type(again.topk) is type(cfg.topk)


def test_yaml_round_trip_via_file(tmp_path):
    cfg = PruneConfig(criterion="snip_momentum", criterion_options={"alpha": 0.9, "beta": 1.0},
                      pattern="2:4", schedule="exp", start_step=10, end_step=200, frequency=20,
                      include=["enc.*"], exclude=["*.out_proj.weight"], seed=7, scope="global")
    path = tmp_path / "sub" / "cfg.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text(encoding="utf-8") == text
    assert PruneConfig.from_yaml(path) == cfg                   # a Path
    assert PruneConfig.from_yaml(str(path)) == cfg              # a str path
    other = tmp_path / "cfg.yml"
    other.write_text(text, encoding="utf-8")
    assert PruneConfig.from_yaml(other) == cfg
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["cfg.yaml"]   # no temp files left


def test_from_yaml_text_and_errors(tmp_path):
    assert PruneConfig.from_yaml("") == PruneConfig()
    cfg = PruneConfig.from_yaml("pattern: '4x1'\ntarget_sparsity: 0.8\nscope: global\n")
    assert (cfg.pattern, cfg.target_sparsity, cfg.scope) == ("4x1", 0.8, "global")
    with pytest.raises(ValueError, match="valid keys"):
        PruneConfig.from_yaml("patern: 4x1\n")
    with pytest.raises(ValueError, match="scope"):
        PruneConfig.from_yaml("scope: globl\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("target_sparsity: 2.0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="target_sparsity"):
        PruneConfig.from_yaml(bad)


def test_failed_yaml_write_leaves_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "cfg.yaml"
    path.write_text("old\n", encoding="utf-8")
    import builtins

    real_open = builtins.open

    def failing_open(file, mode="r", *a, **k):
        if "w" in mode:
            raise OSError("disk full")
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(OSError, match="disk full"):
        PruneConfig().to_yaml(path)
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_parse_pattern():
    assert parse_pattern("1x1") == ("block", 1, 1)
    assert parse_pattern("4x1") == ("block", 4, 1)
    assert parse_pattern("2:4") == ("nm", 2, 4)
    assert parse_pattern("channel") == ("channel", 0, 0)
    assert parse_pattern("kernel") == ("kernel", 0, 0)


def test_misspelled_attribute_is_rejected_with_valid_keys():
    cfg = PruneConfig()
    with pytest.raises(AttributeError, match="no field 'target_sparity'.*valid keys: criterion"):
        cfg.target_sparity = 0.5
    assert not hasattr(cfg, "target_sparity")
