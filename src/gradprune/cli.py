"""The ``gradprune`` command.

Examples::

    gradprune demo                         # digits CNN: criteria x patterns x sparsities
    gradprune demo --quick --out /tmp/d    # a smaller grid, in seconds
    gradprune prune --config recipe.yaml   # one-shot pruning of your model

A recipe for ``gradprune prune`` (YAML, read with ``yaml.safe_load``)::

    model: mypkg.models:make_model     # factory returning the nn.Module (package.module:name)
    checkpoint: weights.pt             # optional state dict, loaded with weights_only=True
    data: mypkg.data:make_batches      # factory returning an iterable of batches (if scores need data)
    loss_fn: mypkg.data:loss_fn        # loss_fn(model, batch) -> scalar loss (if scores need data)
    n_batches: 16                      # optional
    output: pruned-out                 # folder for pruned_model.pt, masks.pt, report.json
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
import importlib
import json
import os
import sys
from typing import Any, Sequence

__all__ = ["main", "load_recipe", "run_recipe", "RECIPE_KEYS"]

RECIPE_KEYS = ("model", "checkpoint", "data", "loss_fn", "n_batches", "output", "prune")


class CLIError(Exception):
    """An error reported as one line."""


def _resolve(spec: Any, field: str):
    if not isinstance(spec, str) or ":" not in spec:
        raise CLIError(f"{field} must be 'package.module:name', got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise CLIError(f"{field}: cannot import module {mod_name!r} ({exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{field}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_recipe(path: str) -> dict:
    """Read and validate a recipe file (keys, types, and the ``prune`` section as a PruneConfig)."""
    try:
        import yaml
    except ImportError:
        raise CLIError("recipes need PyYAML: pip install 'gradprune[yaml]'") from None
    if not os.path.isfile(path):
        raise CLIError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            recipe = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise CLIError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise CLIError(f"config {path} must be a mapping, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise CLIError(f"unknown recipe key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(RECIPE_KEYS)}")
    if "model" not in recipe:
        raise CLIError("recipe needs 'model: package.module:factory'")
    from .prune import make_config

    recipe["prune"] = make_config(None, recipe.get("prune") or {})
    return recipe


def run_recipe(recipe: dict, base_dir: str = ".") -> dict:
    """Build the model and data from a validated recipe, prune one-shot, write the outputs."""
    import torch

    from .config import atomic_write
    from .prune import prune

    for d in (base_dir, os.getcwd()):
        if d not in sys.path:
            sys.path.insert(0, d)
    factory = _resolve(recipe["model"], "model")
    model = factory() if callable(factory) else factory
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"model: {recipe['model']} must return a torch.nn.Module, got {type(model).__name__}")
    if recipe.get("checkpoint"):
        ckpt = os.path.join(base_dir, recipe["checkpoint"])
        if not os.path.isfile(ckpt):
            raise CLIError(f"checkpoint not found: {ckpt}")
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    data = loss_fn = None
    if recipe.get("data"):
        data = _resolve(recipe["data"], "data")
        data = data() if callable(data) else data
    if recipe.get("loss_fn"):
        loss_fn = _resolve(recipe["loss_fn"], "loss_fn")
    result = prune(model, recipe["prune"], data=data, loss_fn=loss_fn, n_batches=recipe.get("n_batches"))
    out = os.path.join(base_dir, recipe.get("output") or "gradprune-out")
    atomic_write(os.path.join(out, "pruned_model.pt"), lambda t: torch.save(model.state_dict(), t))
    atomic_write(os.path.join(out, "masks.pt"), lambda t: torch.save(result.masks.state_dict(), t))
    report = result.report.to_dict()
    report["config"] = result.config.to_dict()

    def write(t):
        with open(t, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)

    atomic_write(os.path.join(out, "report.json"), write)
    print(result.report)
    print(f"wrote {out}/pruned_model.pt, masks.pt, report.json")
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradprune",
        description="Gradient-informed pruning for PyTorch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  gradprune demo                        train, prune and fine-tune a digits CNN\n"
            "  gradprune demo --quick --out /tmp/d   a smaller grid in seconds\n"
            "  gradprune prune --config recipe.yaml  one-shot pruning from a YAML recipe\n"
            "\nrecipe keys: " + ", ".join(RECIPE_KEYS) + " (see `python -m pydoc gradprune.cli`)"
        ),
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="prune a small CNN on scikit-learn's digits, print a table")
    d.add_argument("--out", default="gradprune-out", help="output folder (default: gradprune-out)")
    d.add_argument("--quick", action="store_true", help="fewer criteria, sparsities and epochs")
    d.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("prune", help="one-shot pruning from a YAML recipe")
    r.add_argument("--config", required=True, help="recipe.yaml")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from .demo import run_demo

            if args.seed < 0:
                raise CLIError(f"--seed must be >= 0, got {args.seed}")
            if args.quick:
                run_demo(args.out, criteria=("magnitude", "snip", "random"), sparsities=(0.5, 0.9),
                         epochs=6, seed=args.seed)
            else:
                run_demo(args.out, seed=args.seed)
        elif args.command == "prune":
            recipe = load_recipe(args.config)
            run_recipe(recipe, base_dir=os.path.dirname(os.path.abspath(args.config)))
        return 0
    except KeyboardInterrupt:
        print("gradprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line, not a traceback
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "" if isinstance(exc, CLIError) else f"{type(exc).__name__}: "
        print(f"gradprune: error: {kind}{msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
