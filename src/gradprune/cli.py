"""The ``gradprune`` command.

Examples::

    gradprune demo                         # digits CNN: criteria x patterns x sparsities
    gradprune demo --quick --out /tmp/d    # a smaller grid
    gradprune run recipe.yaml              # any workflow from a YAML recipe (see gradprune.recipes)
    gradprune prune --config recipe.yaml   # one-shot pruning (a recipe of workflow prune, the default)
    gradprune report pruned_model.pt       # per-layer sparsity, params (and FLOPs), a PNG plot;
                                           # also masks.pt, selection.pt, save_pruned/save_pretrained folders

A one-shot recipe (YAML, read with ``yaml.safe_load``)::

    model: mypkg.models:make_model     # factory returning the nn.Module (package.module:name)
    checkpoint: weights.pt             # optional state dict, loaded with weights_only=True
    data: mypkg.data:make_batches      # factory returning an iterable of batches (if scores need data)
    loss_fn: mypkg.data:loss_fn        # loss_fn(model, batch) -> scalar loss (if scores need data)
    n_batches: 16                      # optional
    output: pruned-out                 # folder for pruned_model.pt, masks.pt, report.json
                                       # (default: <recipe name>-out; an earlier run there is
                                       # kept unless --overwrite)
    prune:                             # PruneConfig fields (sparsity = target_sparsity)
      sparsity: 0.9
      criterion: snip
      pattern: 4x1
      scope: global

Errors print one line (``gradprune: error: ...``) and exit with status 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Sequence

from . import __version__
from ._io import load_json
from .recipes import RECIPE_KEYS, WORKFLOWS, RecipeError, _run_recipe, load_recipe, resolve

__all__ = ["main"]

# `gradprune demo --quick`: its help is written from these
QUICK = {"criteria": ("magnitude", "snip", "random"), "sparsities": (0.5, 0.9), "epochs": 6}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradprune",
        description="Gradient-informed pruning for PyTorch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  gradprune demo                        train, prune and fine-tune a digits CNN\n"
            "  gradprune demo --quick --out /tmp/d   a smaller grid\n"
            "  gradprune run recipe.yaml             run a recipe (workflows: " + ", ".join(WORKFLOWS) + ")\n"
            "  gradprune prune --config recipe.yaml  one-shot pruning from a YAML recipe\n"
            "  gradprune report pruned_model.pt      per-layer sparsity table and plot\n"
            "\nrecipe keys: " + ", ".join(RECIPE_KEYS) + " (see `python -m pydoc gradprune.recipes`)"
        ),
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors, and debug log lines")
    p.add_argument("--version", action="version", version=f"gradprune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", help="one of:")
    d = sub.add_parser(
        "demo", help="prune a small CNN on scikit-learn's digits, print a table",
        description="Train a small CNN on scikit-learn's digits, prune copies of it one-shot with "
                    "every criterion x pattern x sparsity, fine-tune each with its masks enforced, and "
                    "print test accuracy. The dense baseline is trained for the same extra steps as the "
                    "fine-tuning, so the comparison is fair. Writes results.json, "
                    "accuracy_vs_sparsity.png and best_model.pt (the most accurate after fine-tuning "
                    "among the runs at the highest target sparsity). Needs gradprune[demo].")
    d.add_argument("--out", default="gradprune-out",
                   help="output folder; files there are replaced (default: gradprune-out)")
    d.add_argument("--quick", action="store_true",
                   help=f"a smaller grid: criteria {', '.join(QUICK['criteria'])}; sparsities "
                        f"{', '.join(f'{s:.0%}' for s in QUICK['sparsities'])}; every pattern; "
                        f"{QUICK['epochs']} training epochs instead of 15".replace("%", "%%"))
    d.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, initialisation, batches and scores (default: 0)")
    r = sub.add_parser("prune", help="one-shot pruning from a YAML recipe (workflow: prune)",
                       description="One-shot pruning from a YAML recipe. The recipe's workflow must be "
                                   "'prune' (the default when it names none); run other workflows "
                                   "with `gradprune run`.")
    r.add_argument("--config", required=True, help="recipe.yaml (workflow: prune)")
    run = sub.add_parser("run", help="run a YAML recipe of any workflow",
                         description="Run a YAML recipe of any workflow: " + ", ".join(WORKFLOWS) + ".")
    run.add_argument("recipe", help="recipe.yaml")
    for cmd in (r, run):
        cmd.add_argument("--overwrite", action="store_true",
                         help="replace an earlier run in the output folder (default: refuse). The folder "
                              "is the recipe's output:, else <recipe name>-out next to the recipe")
    rep = sub.add_parser("report", help="per-layer sparsity/params/FLOPs of any file gradprune writes, and a plot",
                         description="Per-layer sparsity (and params, FLOPs) of masks.pt, selection.pt, a "
                                     "pruned model checkpoint (pruned_model.pt, best_model.pt), a save_pruned "
                                     "folder or a save_pretrained folder, and a PNG plot. Each overall line "
                                     "says what it counts: the prunable weights (the masked tensors) or all "
                                     "weight tensors (2-D and up).")
    rep.add_argument("checkpoint", metavar="path",
                     help="masks.pt, selection.pt, a model checkpoint, a save_pruned or save_pretrained folder")
    rep.add_argument("--model", help="package.module:factory, to count FLOPs")
    rep.add_argument("--example-input", help="package.module:name giving one input, to count FLOPs")
    rep.add_argument("--results", help="a results.json of `gradprune demo`: adds accuracy vs sparsity")
    rep.add_argument("--plot", help="PNG path (default: <path without extension>_report.png, next to it)")
    rep.add_argument("--json", help="also write the report as JSON here")
    return p


def _run_recipe_file(path: str, default_workflow: str | None, overwrite: bool, only: str | None = None) -> None:
    recipe = load_recipe(path, default_workflow=default_workflow)
    if only is not None and recipe["workflow"] != only:
        raise RecipeError(f"{path} is a {recipe['workflow']!r} recipe; `gradprune prune` runs one-shot "
                          f"pruning (workflow: prune) only: use `gradprune run {path}`")
    _report_dict, text, out, files = _run_recipe(recipe, os.path.dirname(os.path.abspath(path)), overwrite)
    print(text)
    print(f"wrote {', '.join(files)} to {out}")


@contextlib.contextmanager
def _logging_to_stderr(debug: bool):
    """The command's log records go to standard error, one message a line, around any bars."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    log = logging.getLogger("gradprune")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        with logging_redirect_tqdm(loggers=[log]):
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _report(args) -> None:
    from .report import checkpoint_report, format_report, plot_report, write_report_json

    factory = example = None
    if args.model or args.example_input:
        if not (args.model and args.example_input):
            raise RecipeError("--model and --example-input go together (both package.module:name)")
        sys.path.insert(0, os.getcwd())
        factory = resolve(args.model, "--model")
        example = resolve(args.example_input, "--example-input")
        example = example() if callable(example) else example
    results = None
    if args.results:
        if not os.path.isfile(args.results):
            raise RecipeError(f"results file not found: {args.results}")
        results = load_json(args.results)
        runs = results.get("runs") if isinstance(results, dict) else None
        if not isinstance(runs, list) or not all(
                isinstance(r, dict) and {"criterion", "pattern", "sparsity", "accuracy"} <= set(r) for r in runs):
            raise RecipeError(f"--results {args.results} is not a results.json of `gradprune demo` (a 'runs' "
                              "list of criterion, pattern, sparsity, accuracy)")
    rep = checkpoint_report(args.checkpoint, factory, example)
    print(format_report(rep))
    plot = args.plot or os.path.splitext(os.path.normpath(args.checkpoint))[0] + "_report.png"
    written = plot_report(rep, plot, results)
    if written:
        print(f"wrote {written}")
    if args.json:
        write_report_json(rep, args.json)
        print(f"wrote {args.json}")


def _demo(args) -> None:
    import torch

    from .demo import format_summary, run_demo

    # this process is ours: one intra-op thread runs these tiny convolutions as fast as
    # two on an idle 2-core machine, and far faster when the cores are shared
    torch.set_num_threads(1)

    if args.seed < 0:
        raise RecipeError(f"--seed must be >= 0, got {args.seed}")
    if args.quick:
        summary = run_demo(args.out, seed=args.seed, **QUICK)
    else:
        summary = run_demo(args.out, seed=args.seed)
    print(format_summary(summary))


def _command(args) -> None:
    if args.command == "demo":
        _demo(args)
    elif args.command == "prune":
        _run_recipe_file(args.config, default_workflow="prune", overwrite=args.overwrite, only="prune")
    elif args.command == "run":
        _run_recipe_file(args.recipe, default_workflow=None, overwrite=args.overwrite)
    elif args.command == "report":
        _report(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with _logging_to_stderr(args.debug):
            _command(args)
        return 0
    except KeyboardInterrupt:
        print("gradprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line, not a traceback
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "" if isinstance(exc, RecipeError) else f"{type(exc).__name__}: "
        print(f"gradprune: error: {kind}{msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
