"""Issue #19 points 5 and 7: filters that say when they match nothing, and honest defaults."""

import re

import pytest
import torch

import gradprune as gp

PRESETS = ("rigl", "set", "snfs", "static", "pruning")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_requires_total_steps(preset):
    """No silent total_steps=1000: omitting it raises TypeError naming it."""
    with pytest.raises(TypeError, match="total_steps"):
        getattr(gp.SparseConfig, preset)(density=0.2)
    cfg = getattr(gp.SparseConfig, preset)(density=0.2, total_steps=80)
    assert cfg.total_steps == 80
    assert cfg.end_step in (0, 60)


def _mlp():
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_one_shot_prune_refuses_movement_pointing_to_pruner():
    import torch
    from torch import nn
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(4, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    for kw in (dict(criterion="movement"), dict(config=gp.PruneConfig(criterion="movement"))):
        with pytest.raises(ValueError, match=r"movement.*Pruner"):
            gp.prune(model, sparsity=0.5, data=data, loss_fn=loss_fn, **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # movement stays available where it belongs: pruning while fine-tuning
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = gp.Pruner(model, optimizer=opt, criterion="movement", target_sparsity=0.5, start_step=0,
                       end_step=2, frequency=1)
    assert pruner.config.criterion == "movement"


# -- point 5: include/exclude filters ----------------------------------------------------------

def _model():
    from torch import nn
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_module_names_select_the_modules_weights(field):
    """Neural Compressor users write exclude=["2"] (a module name): it selects that module's weights,
    and a container's name selects every prunable weight below it."""
    import warnings
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = list(gp.find_targets(model, **{field: ["2"]}))
        nested = list(gp.find_targets(model, **{field: ["4"]}, include_classifier=True))
    if field == "include":
        assert got == ["2.weight"]
        assert nested == ["4.0.weight", "4.1.weight"]
    else:
        assert got == ["0.weight", "4.0.weight"]
        assert nested == ["0.weight", "2.weight"]


REGEX_CASES = [
    (r"re:[02]\.weight", ["0.weight", "2.weight"]),
    (r"re:4\..*", ["4.0.weight", "4.1.weight"]),
    (r"re:[24]", ["2.weight", "4.0.weight", "4.1.weight"]),       # module names "2" and "4"
    (r"re:4\.[01]", ["4.0.weight", "4.1.weight"]),
]


@pytest.mark.parametrize("pattern,want", REGEX_CASES)
def test_regex_patterns_fullmatch_parameter_or_module_names(pattern, want):
    model = _model()
    assert list(gp.find_targets(model, include=[pattern], include_classifier=True)) == want
    everything = list(gp.find_targets(model, include_classifier=True))
    assert list(gp.find_targets(model, exclude=[pattern], include_classifier=True)) == \
        [n for n in everything if n not in want]


def test_regex_is_a_full_match_not_a_search():
    # re.search would find "0" in "4.0.weight" too; a full match names module "0" only
    model = _model()
    assert list(gp.find_targets(model, include=["re:0"], include_classifier=True)) == ["0.weight"]
    assert list(gp.find_targets(model, include=[r"re:.*0\.weight"], include_classifier=True)) == \
        ["0.weight", "4.0.weight"]
    with pytest.warns(UserWarning, match=r"include pattern 're:weight' matches no parameter"):
        with pytest.raises(ValueError, match="no prunable parameters"):
            gp.find_targets(model, include=["re:weight"])


@pytest.mark.parametrize("field", ["include", "exclude"])
@pytest.mark.parametrize("pattern", ["encodr", "1", "re:encodr.*", "4.weight"])
def test_pattern_matching_nothing_warns_or_raises_when_strict(field, pattern):
    """"1" is a ReLU (no parameters); "4.weight" is no parameter (4 is a container)."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=rf"{field} pattern {re.escape(repr(pattern))} matches no"):
        try:
            gp.find_targets(model, **{field: [pattern]})
        except ValueError:
            assert field == "include"   # include of nothing leaves nothing to prune
    with pytest.raises(ValueError, match=rf"{field} pattern {re.escape(repr(pattern))} matches no"
                                         r".*'0\.weight'"):
        gp.find_targets(model, **{field: ["0", pattern]}, strict=True)
    kw = {field: ["0", pattern], "strict_filters": True, "sparsity": 0.5}
    with pytest.raises(ValueError, match=re.escape(repr(pattern))):
        gp.prune(model, **kw)
    with pytest.raises(ValueError, match=re.escape(repr(pattern))):
        gp.SparseTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         gp.SparseConfig.rigl(density=0.5, total_steps=10, **{field: ["0", pattern]},
                                              strict_filters=True))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cls", [gp.PruneConfig, gp.SparseConfig])
def test_filter_fields_validate_and_round_trip(cls, tmp_path):
    with pytest.raises(TypeError, match="strict_filters"):
        cls(strict_filters="yes")
    with pytest.raises(ValueError, match=r"include pattern 're:enc\[' is not a valid regular expression"):
        cls(include=["re:enc["])
    with pytest.raises(ValueError, match="exclude pattern"):
        cls(exclude=["re:(a"])
    cfg = cls(include=[r"re:encoder\.layer\.[0-5]\..*", "2"], exclude=["re:.*bias"], strict_filters=True)
    assert cls.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    again = cls.from_yaml(path)
    assert again == cfg and again.strict_filters is True
    assert again.include == (r"re:encoder\.layer\.[0-5]\..*", "2")


# -- point 7: one counting rule, its exception written down ------------------------------------

def test_readme_counting_rule_states_the_topk_fraction_exception_and_it_holds():
    """The README's counting rule is round half up; a topk fraction keeps ceil(f * remaining)
    entries instead: the README must say so, and the code must do what it says."""
    import math
    import pathlib
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rule = readme[readme.index("Counting rule:"):]
    rule = rule[:rule.index("\n\n")]
    assert "round_half_up(s·n)" in rule
    assert "`topk` *fraction*" in rule and "`ceil(f·r)`" in rule
    from torch import nn
    for f in (0.21, 0.25, 0.5, 0.05, 1.0):      # 10 entries: ceil vs round half up differ at 0.21
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 10))
        res = gp.prune(model, topk=f, criterion="magnitude")
        assert int(res.masks["0.weight"].sum()) == math.ceil(round(f * 10, 9)), f
