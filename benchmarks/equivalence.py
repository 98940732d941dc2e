#!/usr/bin/env python
"""Migration recipes checked by running both libraries: Neural Compressor 3.7.1 vs gradprune.

Runs in the peer virtualenv built by ``benchmarks/setup_peers.sh`` (``.bench-venv``). For every case
it builds two copies of the same tiny model, trains them with the same SGD optimizer on the same
batches, one driven by INC's ``prepare_compression`` callbacks and one by ``gp.Pruner`` configured
as ``docs/migration/from_neural_compressor.md`` says, and at *every* step compares

* the masks: before each forward pass (INC updates its masks in ``on_step_begin`` of step ``g``;
  gradprune at the end of step ``g - 1``, the same point in training), entry by entry;
* the weights of the pruned layers (exactly equal, or the largest absolute difference);
* the scores: after ``on_before_optimizer_step`` up to the last prune step (gradient criteria), or
  at each prune event (magnitude), reduced the way each library reduces them (block units for
  ``NxM``; entries for ``1x1`` and ``N:M``) and laid out like the weight.

Each case runs the *documented* gradprune recipe and, where the guide used to say something else,
the *old* recipe too, so the table shows what the change is worth. Raw results go to
``benchmarks/results/equivalence.json``, a table to ``benchmarks/results/equivalence.md``.

sparselearning is not on PyPI and is not run here (see the Markdown's notes).

Usage:
    .bench-venv/bin/python benchmarks/equivalence.py
    .bench-venv/bin/python benchmarks/equivalence.py --from-json benchmarks/results/equivalence.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import shlex
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*pkg_resources.*")
HERE = Path(__file__).resolve().parent

import gradprune as gp  # noqa: E402
from gradprune.patterns import get_pattern  # noqa: E402

try:
    import neural_compressor
    from neural_compressor.training import WeightPruningConfig, prepare_compression
    INC_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    neural_compressor = None
    INC_ERROR = f"{type(exc).__name__}: {exc}"

sys.path.insert(0, str(HERE))
from gradual_vs_peers import quiet_inc  # noqa: E402  (silences INC's per-event INFO logging)

# INC schedule used throughout (the guide's example): events at the start of steps 1, 11, 21, 31
INC_SCHED = dict(start=1, end=31, freq=10)
STEPS = 36


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


MODELS = {"mlp": (MLP, ["fc1", "fc2"], (16,)), "cnn": (CNN, ["conv1", "conv2"], (4, 4, 4))}


def inc_nm_to_gp(pattern):
    """INC's "N:M" prunes N of every M; gradprune's keeps N (the guide's ``from_inc_nm``)."""
    pruned, m = map(int, pattern.split(":"))
    return f"{m - pruned}:{m}"


def documented_gp(inc):
    """The gradprune config the migration guide gives for an INC config (dict of INC fields)."""
    crit = inc["pruning_type"]
    pattern = inc["pattern"]
    gp_pattern = inc_nm_to_gp(pattern) if ":" in pattern else pattern
    return dict(criterion=crit, pattern=gp_pattern, target_sparsity=inc["target_sparsity"],
                scope="global", schedule="exp", reduce=inc.get("criterion_reduce_type", "mean"),
                # INC prunes at the START of its step g, gradprune at the END of step t = g - 1, and
                # INC's first event (k = 0) prunes nothing: start one frequency later, minus one
                start_step=inc["start_step"] + inc["pruning_frequency"] - 1,
                end_step=inc["end_step"] - 1, frequency=inc["pruning_frequency"],
                accumulate="last" if crit in ("gradient", "snip") else "mean",
                reduce_each_step=inc.get("criterion_reduce_type", "mean") == "max",
                # INC truncates its unit counts: int(units * sparsity)
                count_rounding="floor")


def old_guide_gp(inc):
    """What the guide said before: start one frequency later, same end, averaged scores."""
    cfg = documented_gp(inc)
    cfg.update(start_step=inc["start_step"] + inc["pruning_frequency"], end_step=inc["end_step"],
               accumulate="mean", reduce_each_step=False, count_rounding="half_up")
    return cfg


# case name -> (model kind, INC fields, {variant: gradprune config overrides})
def cases():
    base = dict(target_sparsity=0.75, start_step=INC_SCHED["start"], end_step=INC_SCHED["end"],
                pruning_frequency=INC_SCHED["freq"], pruning_scope="global", sparsity_decay_type="exp")
    out = {}
    for crit in ("snip_momentum", "snip", "gradient", "magnitude"):
        out[f"mlp {crit} 4x1"] = ("mlp", dict(base, pruning_type=crit, pattern="4x1"))
        out[f"mlp {crit} 1x1"] = ("mlp", dict(base, pruning_type=crit, pattern="1x1"))
    out["mlp snip_momentum 4x1 max"] = ("mlp", dict(base, pruning_type="snip_momentum", pattern="4x1",
                                                    criterion_reduce_type="max"))
    out["mlp snip 4x1 max"] = ("mlp", dict(base, pruning_type="snip", pattern="4x1",
                                           criterion_reduce_type="max"))
    out["mlp snip_momentum 1x4"] = ("mlp", dict(base, pruning_type="snip_momentum", pattern="1x4"))
    for crit in ("snip_momentum", "magnitude"):
        out[f"mlp {crit} 2:4"] = ("mlp", dict(base, pruning_type=crit, pattern="2:4", target_sparsity=0.5))
        out[f"mlp {crit} 1:4"] = ("mlp", dict(base, pruning_type=crit, pattern="1:4", target_sparsity=0.25))
        out[f"cnn {crit} 2:4"] = ("cnn", dict(base, pruning_type=crit, pattern="2:4", target_sparsity=0.5))
        out[f"cnn {crit} 4x1"] = ("cnn", dict(base, pruning_type=crit, pattern="4x1"))
    # targets at which INC's truncated unit counts equal gradprune's rounded ones at every event
    # (exp schedule, K = 3): the block cases above differ in counts at 0.75
    for crit in ("snip_momentum", "snip", "magnitude"):
        out[f"mlp {crit} 4x1 max @0.68"] = ("mlp", dict(base, pruning_type=crit, pattern="4x1",
                                                       criterion_reduce_type="max", target_sparsity=0.68))
        out[f"cnn {crit} 4x1 @0.7"] = ("cnn", dict(base, pruning_type=crit, pattern="4x1", target_sparsity=0.7))
    return out


def variants(name, inc):
    v = {"documented": documented_gp(inc), "old guide": old_guide_gp(inc)}
    if ":" in inc["pattern"] and name.startswith("cnn"):
        flat = documented_gp(inc)
        flat["pattern"] += "-flat"
        v["N:M-flat (old conv layout)"] = flat
    doc = documented_gp(inc)
    v["documented, round half up"] = dict(doc, count_rounding="half_up")
    if doc["reduce_each_step"]:
        v["documented, reduce once"] = dict(doc, reduce_each_step=False)
    if doc["accumulate"] == "last":
        v["documented, accumulate mean"] = dict(doc, accumulate="mean")
    return v


# --------------------------------------------------------------------------------------------
def inc_setup(model, names, inc):
    quiet_inc()
    cfg = WeightPruningConfig([{"op_names": [f"^{n}$" for n in names]}],
                              op_names=[f"^{n}$" for n in names], excluded_op_names=[], **inc)
    cm = prepare_compression(model, cfg)
    cm.callbacks.on_train_begin()
    pruner = cm.callbacks.callbacks_list[0].pruners[0]
    return cm, pruner


def inc_entry_scores(pruner, name, shape):
    """INC's current score for one layer, laid out like the weight (block scores repeated)."""
    s = pruner.criterion.scores.get(name)
    if s is None:
        return None
    s = s.detach().float()
    if tuple(s.shape) == tuple(shape):
        return s
    return pruner.pattern.reshape_reduced_to_orig(s, name, shape).float()


def gp_entry_scores(pruner, name, spec, reduce):
    """gradprune's current score for one layer as INC would hold it: block units repeated over
    their entries (``NxM``), entries otherwise."""
    return _as_inc_entries(pruner.criterion.scores[f"{name}.weight"].detach().float(), spec, reduce)


def _as_inc_entries(s, spec, reduce):
    p = get_pattern(spec)
    if not hasattr(p, "rows") or p.rows == p.cols == 1:
        return s
    units = p.unit_scores(s, reduce)
    mat = units.reshape(s.shape[0] // p.rows, -1).repeat_interleave(p.rows, 0).repeat_interleave(p.cols, 1)
    return mat.reshape(s.shape)


def rel_diff(a, b):
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) / scale


def run_case(kind, inc, gcfg, seed=0):
    make, names, in_shape = MODELS[kind]
    torch.manual_seed(seed)
    base = make()
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(8, *in_shape, generator=gen), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(STEPS)]
    m_inc, m_gp = copy.deepcopy(base), copy.deepcopy(base)
    cm, ipr = inc_setup(m_inc, names, inc)
    gpr = gp.Pruner(m_gp, gp.PruneConfig(include=[f"{n}.weight" for n in names], **gcfg))
    o_inc = torch.optim.SGD(m_inc.parameters(), lr=0.05, momentum=0.9)
    o_gp = torch.optim.SGD(m_gp.parameters(), lr=0.05, momentum=0.9)
    mods_inc = dict(m_inc.named_modules())
    mods_gp = dict(m_gp.named_modules())
    inc_events = set(range(inc["start_step"], inc["end_step"] + 1, inc["pruning_frequency"]))
    rows = []
    for step, (x, y) in enumerate(data):
        cm.callbacks.on_step_begin(step)
        gpr.on_step_begin()
        # masks and weights before the forward pass of `step`
        agree = total = 0
        w_diff = 0.0
        sparsity_inc = []
        for n in names:
            mi = ipr.masks[n].bool().reshape(mods_inc[n].weight.shape)
            mg = gpr.masks[f"{n}.weight"]
            agree += int((mi == mg).sum())
            total += mi.numel()
            sparsity_inc.append(int((~mi).sum()))
            w_diff = max(w_diff, float((mods_inc[n].weight - mods_gp[n].weight).detach().abs().max()))
        row = {"step": step, "mask_agreement": agree / total,
               "sparsity_inc": sum(sparsity_inc) / total, "sparsity_gp": float(gpr.masks.sparsity()),
               "weight_max_abs_diff": w_diff, "score_rel_diff": None}
        # magnitude: INC computes |W| at its prune events (on_step_begin), gradprune reads |W| then
        # (INC scored |W| before masking it; compare on the entries both masks keep)
        if inc["pruning_type"] == "magnitude" and step in inc_events:
            row["score_rel_diff"] = max(
                rel_diff(*(t[keep] for t in (
                    inc_entry_scores(ipr, n, mods_inc[n].weight.shape),
                    _abs_entry(mods_gp[n].weight, gcfg["pattern"], gcfg["reduce"]))))
                for n in names
                for keep in [ipr.masks[n].bool().reshape(mods_inc[n].weight.shape) & gpr.masks[f"{n}.weight"]])
        loss_i = F.cross_entropy(m_inc(x), y)
        loss_g = F.cross_entropy(m_gp(x), y)
        loss_i.backward()
        loss_g.backward()
        cm.callbacks.on_before_optimizer_step()
        gpr.on_before_optimizer_step()
        if inc["pruning_type"] != "magnitude" and step < inc["end_step"]:
            row["score_rel_diff"] = max(
                rel_diff(inc_entry_scores(ipr, n, mods_inc[n].weight.shape),
                         gp_entry_scores(gpr, n, gcfg["pattern"], gcfg["reduce"])) for n in names)
        o_inc.step()
        o_gp.step()
        cm.callbacks.on_after_optimizer_step()
        gpr.on_after_optimizer_step()
        o_inc.zero_grad()
        o_gp.zero_grad()
        rows.append(row)
    cm.callbacks.on_train_end()
    return rows


def _abs_entry(weight, spec, reduce):
    return _as_inc_entries(weight.detach().abs().float(), spec, reduce)


def summarize(rows):
    agreement = [r["mask_agreement"] for r in rows]
    scores = [r["score_rel_diff"] for r in rows if r["score_rel_diff"] is not None]
    return {
        "steps": len(rows),
        "steps_masks_identical": sum(a == 1.0 for a in agreement),
        "first_step_masks_differ": next((r["step"] for r in rows if r["mask_agreement"] < 1.0), None),
        "sparsity_differs_at_first_difference": next(
            (r["sparsity_inc"] != r["sparsity_gp"] for r in rows if r["mask_agreement"] < 1.0), None),
        "min_mask_agreement": min(agreement),
        "final_mask_agreement": agreement[-1],
        "final_sparsity_inc": rows[-1]["sparsity_inc"],
        "final_sparsity_gp": rows[-1]["sparsity_gp"],
        "max_weight_abs_diff": max(r["weight_max_abs_diff"] for r in rows),
        "max_score_rel_diff": max(scores) if scores else None,
    }


# --------------------------------------------------------------------------------------------
def render(result):
    L = ["# Migration recipes checked against Neural Compressor", "",
         f"Generated by `{result['command']}`. Versions: "
         + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", "",
         f"Every case trains two copies of one tiny model ({STEPS} SGD steps, batch 8, the same batches), "
         "one pruned by INC's callbacks, one by `gp.Pruner`, and compares before every forward pass "
         "the masks of the pruned layers entry by entry and their weights, and the scores each "
         "library holds (INC: after `on_before_optimizer_step` up to its last prune step, or at its "
         "prune events for magnitude), block-reduced as each library reduces them. INC schedule: "
         f"`start_step={INC_SCHED['start']}, end_step={INC_SCHED['end']}, "
         f"pruning_frequency={INC_SCHED['freq']}`, global scope, exp decay.", "",
         "Variants: **documented** = the recipe in `docs/migration/from_neural_compressor.md` "
         "(`start_step = INC start + frequency - 1`, `end_step = INC end - 1`, "
         "`accumulate=\"last\"` for gradient/snip, `reduce_each_step=True` with `reduce=\"max\"`, "
         "`count_rounding=\"floor\"`); **documented, round half up** = the same with gradprune's "
         "default `count_rounding=\"half_up\"` (the documented recipe before the option existed); "
         "**old guide** = what the guide said before (`start_step = INC start + frequency`, same "
         "`end_step`, default accumulation); **N:M-flat** = the documented recipe with the pre-0.2 "
         "conv N:M grouping; **documented, reduce once** / **documented, accumulate mean** = the "
         "documented recipe without `reduce_each_step` / with the default accumulation.", "",
         "| case | variant | steps with identical masks | first step differing (count differs?) | "
         "min mask agreement | final agreement | final sparsity INC / gp | max weight diff | "
         "max score rel. diff |",
         "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        s = c["summary"]
        sc = "—" if s["max_score_rel_diff"] is None else f"{s['max_score_rel_diff']:.1e}"
        first = ("—" if s["first_step_masks_differ"] is None else
                 f"{s['first_step_masks_differ']} ({'yes' if s['sparsity_differs_at_first_difference'] else 'no'})")
        L.append(f"| {c['case']} | {c['variant']} | {s['steps_masks_identical']}/{s['steps']} | {first} | "
                 f"{s['min_mask_agreement']:.4f} | {s['final_mask_agreement']:.4f} | "
                 f"{s['final_sparsity_inc']:.4f} / {s['final_sparsity_gp']:.4f} | "
                 f"{s['max_weight_abs_diff']:.1e} | {sc} |")
    L += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(L) + "\n"


NOTES = [
    "Mask agreement is the fraction of entries of the pruned layers on which the two masks agree, "
    "measured before each forward pass; 'identical' means agreement 1.0.",
    "Scores: INC's `gradient`/`snip` hold the last step's score and gradprune's the same with "
    "`accumulate=\"last\"`; with the default `accumulate=\"mean\"` (old guide) they differ.",
    "INC recomputes its masks from the scores at every event without keeping earlier pruned "
    "entries pruned; for `snip`/`snip_momentum`/`magnitude` a pruned weight scores 0 and stays "
    "pruned, but `gradient` scores pruned weights by their (nonzero) gradient, so INC can bring "
    "a pruned weight back where gradprune keeps it pruned: see the gradient rows.",
    "Unit counts: INC truncates the number of units to prune (`int(units * s)`); gradprune rounds "
    "half up by default and truncates with `count_rounding=\"floor\"` (the documented recipe). With "
    "half-up rounding, where the two counts differ at an intermediate event the masks differ by one "
    "or more units from then on (the 'count differs?' column) and the runs drift apart (different "
    "weights, so different scores); with floor every `1x1`, `NxM`/`1x4` block case is identical at "
    "every step.",
    "N:M is not a unit-count difference: both libraries count whole groups of M made N:M "
    "(`int(groups * s * M / N_pruned)` with floor), but they rank the groups differently. INC "
    "(`patterns/ninm.py`, `reduce_scores`) scores a group by the reduced scores of the entries it "
    "*keeps* (the lowest N_pruned zeroed, then reduced over all M), gradprune by the entries it "
    "would prune; and INC prunes every score tied at its thresholds, so its sparsity ends near, not "
    "on, the target (final sparsity column: 0.5091 for 2:4 on the MLP). The two agree at every step "
    "only where the choice of groups coincides (INC 1:4 magnitude on the MLP); floor rounding does "
    "not change that (2:4 rows).",
    "sparselearning (`MagnitudePruneDecay`) is not on PyPI and is not driven by this script; the "
    "guide's mapping for it is derived from its source, not checked by running it.",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "equivalence"))
    ap.add_argument("--from-json", help="re-render the Markdown from a JSON result")
    ap.add_argument("--only", help="run only cases whose name contains this")
    args = ap.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        Path(args.out + ".md").write_text(render(result))
        return 0
    if INC_ERROR:
        print(f"Neural Compressor is not importable: {INC_ERROR}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    result = {"command": "python benchmarks/equivalence.py" + "".join(
                  f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])),
              "versions": {"gradprune": getattr(gp, "__version__", "?"), "neural-compressor":
                           neural_compressor.__version__, "torch": torch.__version__,
                           "python": platform.python_version()},
              "inc_schedule": INC_SCHED, "steps": STEPS, "notes": NOTES, "cases": []}
    for name, (kind, inc) in cases().items():
        if args.only and args.only not in name:
            continue
        for variant, gcfg in variants(name, inc).items():
            rows = run_case(kind, inc, gcfg)
            summ = summarize(rows)
            logging.getLogger("equivalence").warning("%s / %s: %s", name, variant, summ)
            result["cases"].append({"case": name, "variant": variant, "model": kind, "inc": inc,
                                    "gradprune": gcfg, "summary": summ, "per_step": rows})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    Path(args.out + ".md").write_text(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
