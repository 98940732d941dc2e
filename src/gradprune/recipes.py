"""YAML recipes for every workflow, run by ``gradprune run recipe.yaml``.

A recipe names its ``workflow`` and where the model, data and loss come from
(``package.module:name``; a callable is called with no arguments), plus one section for the
workflow. Every section is validated with the same errors as the Python configs (unknown keys list
the valid ones) *before* anything runs; outputs are written to ``output`` as one set (a failure
leaves the previous set as it was). ``output`` defaults to ``<recipe file name>-out`` next to the
recipe (``gradual.yaml`` -> ``gradual-out/``); an earlier run there is refused before any work
unless ``--overwrite`` is given.

=============== ============================================ ======================================
workflow         section                                      writes
=============== ============================================ ======================================
``prune``        ``prune:`` PruneConfig fields, ``n_batches``  pruned_model.pt, masks.pt, report.json
``gradual``      ``prune:`` PruneConfig, ``train:``            pruned_model.pt, masks.pt, report.json
``sparse``       ``sparse:`` ``preset`` + SparseConfig fields, pruned_model.pt, masks.pt, report.json
                 ``train:``
``search``       ``search:`` constraints, method, rules,       pruned/ (save_pruned), report.json
                 ``example_input`` (package.module:name)
``preprune``     ``preprune:`` PrePruneConfig fields           selection.pt, report.json
``llm_structured`` ``llm:`` constraints, method, axes,         pruned/ (save_pretrained), report.json,
                 uniform, ``distill:``, ``eval:``; recipe key    report.md, widths.png
                 ``eval_data`` (held-out token windows)
=============== ============================================ ======================================

``llm_structured`` (a Hugging Face causal LM; see :mod:`gradprune.llm_structured`) scores,
searches, exports, distils the export from the original model and measures held-out perplexity,
prefill latency and decode tokens/s of the dense, one-shot and distilled models.

``train:`` holds ``steps`` (optimizer steps; the data is cycled), ``optimizer`` (``sgd``,
``adam``, ``adamw``), ``lr``, ``momentum``, ``weight_decay``.

Example recipe::

    workflow: gradual
    model: mypkg.models:make_model
    data: mypkg.data:make_batches
    loss_fn: mypkg.data:loss_fn
    output: out
    prune: {criterion: snip_momentum, pattern: 4x1, target_sparsity: 0.8, end_step: 100, frequency: 10}
    train: {steps: 150, optimizer: adam, lr: 0.001}
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
import sys
from typing import Any

import torch
from torch import nn

from ._checks import check_choice, check_float, check_int
from ._io import load_torch, write_file_set
from .config import yaml_load

logger = logging.getLogger(__name__)

__all__ = ["RecipeError", "load_recipe", "run_recipe", "WORKFLOWS", "RECIPE_KEYS", "TRAIN_KEYS"]

WORKFLOWS = ("prune", "gradual", "sparse", "search", "preprune", "llm_structured")
RECIPE_KEYS = ("workflow", "model", "checkpoint", "data", "loss_fn", "n_batches", "output",
               "prune", "train", "sparse", "search", "preprune", "llm", "eval_data")
TRAIN_KEYS = ("steps", "optimizer", "lr", "momentum", "weight_decay")
SEARCH_KEYS = ("constraints", "method", "rules", "example_input", "max_iter_data_loader")
SECTION_OF = {"prune": ("prune",), "gradual": ("prune", "train"), "sparse": ("sparse", "train"),
              "search": ("search",), "preprune": ("preprune",), "llm_structured": ("llm",)}


class RecipeError(ValueError):
    """A recipe that cannot be run, with a one-line reason."""


def _yaml():
    try:
        import yaml
    except ImportError:
        raise RecipeError("recipes need PyYAML: pip install 'gradprune[yaml]'") from None
    return yaml


def resolve(spec: Any, field: str):
    """Import ``package.module:name`` (dotted attribute paths allowed)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise RecipeError(f"{field} must be 'package.module:name', got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise RecipeError(f"{field}: cannot import module {mod_name!r} ({exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{field}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _check_keys(section: Any, name: str, valid) -> dict:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise RecipeError(f"{name} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise RecipeError(f"unknown {name} key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")
    return dict(section)


def _validate_train(train: dict) -> dict:
    train = _check_keys(train, "train", TRAIN_KEYS)
    out = {"steps": check_int("train.steps", train.get("steps", 100), min_value=1),
           "optimizer": check_choice("train.optimizer", train.get("optimizer", "adam"), ("sgd", "adam", "adamw")),
           "lr": check_float("train.lr", train.get("lr", 1e-3), low=0.0, low_open=True),
           "momentum": check_float("train.momentum", train.get("momentum", 0.9), low=0.0, high=1.0),
           "weight_decay": check_float("train.weight_decay", train.get("weight_decay", 0.0), low=0.0)}
    return out


def load_recipe(path: str, default_workflow: str | None = None) -> dict:
    """Read (``yaml.safe_load`` with YAML 1.2 numbers, see :func:`gradprune.config.yaml_load`) and
    validate a recipe; returns it with config objects built."""
    yaml = _yaml()
    if not os.path.isfile(path):
        raise RecipeError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            recipe = yaml_load(fh)  # safe_load with YAML 1.2 numbers (2:4 is a pattern, 5e-1 a float)
        except yaml.YAMLError as exc:
            raise RecipeError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    recipe = validate_recipe(recipe, default_workflow=default_workflow)
    if not recipe.get("output"):  # each recipe file its own folder, next to it: gradual.yaml -> gradual-out
        recipe["output"] = os.path.splitext(os.path.basename(path))[0] + "-out"
    return recipe


def validate_recipe(recipe: Any, default_workflow: str | None = None) -> dict:
    """Validate a recipe mapping (see the module docs) without running anything."""
    if not isinstance(recipe, dict):
        raise RecipeError(f"a recipe must be a mapping, got {type(recipe).__name__}")
    recipe = _check_keys(recipe, "recipe", RECIPE_KEYS)
    workflow = recipe.get("workflow", default_workflow)
    if workflow is None:
        raise RecipeError(f"recipe needs 'workflow: one of {', '.join(WORKFLOWS)}'")
    try:
        check_choice("workflow", workflow, WORKFLOWS)
    except (TypeError, ValueError) as exc:
        raise RecipeError(str(exc)) from None
    recipe["workflow"] = workflow
    if "model" not in recipe:
        raise RecipeError("recipe needs 'model: package.module:factory'")
    stray = [k for k in ("prune", "train", "sparse", "search", "preprune", "llm")
             if k in recipe and k not in SECTION_OF[workflow]]
    if stray:
        raise RecipeError(f"section(s) {stray} do not apply to workflow {workflow!r} "
                          f"(it uses {list(SECTION_OF[workflow])})")
    if recipe.get("n_batches") is not None:
        check_int("n_batches", recipe["n_batches"], min_value=1)
    if workflow in ("prune", "gradual"):
        from .prune import make_config

        section = recipe.get("prune") or {}
        if not isinstance(section, dict):
            raise RecipeError(f"prune must be a mapping, got {type(section).__name__}")
        recipe["prune"] = make_config(None, section)  # the same errors as PruneConfig
    train_given = recipe.get("train") is not None
    if workflow in ("gradual", "sparse"):
        recipe["train"] = _validate_train(recipe.get("train"))
    if workflow == "sparse":
        from .sparse_training import SparseConfig

        section = dict(recipe.get("sparse") or {})
        preset = section.pop("preset", "rigl")
        presets = ("rigl", "set", "snfs", "static", "pruning")
        check_choice("sparse.preset", preset, presets)
        if "total_steps" not in section:
            section["total_steps"] = recipe["train"]["steps"]
        recipe["sparse"] = getattr(SparseConfig, preset)(**section)
        if not train_given:
            raise RecipeError("workflow 'sparse' needs a train: section (steps, optimizer, lr, ...): "
                              "sparse training trains the model")
    if workflow == "search":
        section = _check_keys(recipe.get("search"), "search", SEARCH_KEYS)
        if "constraints" not in section:
            raise RecipeError("search needs constraints, e.g. {flops: '50%'}")
        if "example_input" not in section:
            raise RecipeError("search needs example_input: package.module:name")
        from .structured import METHODS

        section.setdefault("method", "gradnas")
        check_choice("search.method", section["method"], METHODS)
        recipe["search"] = section
    if workflow == "llm_structured":
        from .llm_structured import validate_section

        if "data" not in recipe:
            raise RecipeError("workflow 'llm_structured' needs data: (batches of token ids, package.module:name)")
        for key in ("data", "eval_data", "loss_fn"):
            if key in recipe and (not isinstance(recipe[key], str) or ":" not in recipe[key]):
                raise RecipeError(f"{key} must be 'package.module:name', got {recipe[key]!r}")
        recipe["llm"] = validate_section(recipe.get("llm"), RecipeError)
    elif "eval_data" in recipe:
        raise RecipeError(f"eval_data applies to workflow 'llm_structured' only, not {workflow!r}")
    if workflow == "preprune":
        from .preprune import PrePruneConfig

        recipe["preprune"] = PrePruneConfig.from_dict(dict(recipe.get("preprune") or {}))
    return recipe


def _build(recipe: dict, base_dir: str):
    for d in (base_dir, os.getcwd()):
        if d not in sys.path:
            sys.path.insert(0, d)
    factory = resolve(recipe["model"], "model")
    model = factory() if callable(factory) else factory
    if not isinstance(model, nn.Module):
        raise RecipeError(f"model: {recipe['model']} must give a torch.nn.Module, got {type(model).__name__}")
    if recipe.get("checkpoint"):
        ckpt = os.path.join(base_dir, recipe["checkpoint"])
        if not os.path.isfile(ckpt):
            raise RecipeError(f"checkpoint not found: {ckpt}")
        model.load_state_dict(load_torch(ckpt))
    data = loss_fn = None
    if recipe.get("data"):
        data = resolve(recipe["data"], "data")
        data = data() if callable(data) else data
    if recipe.get("loss_fn"):
        loss_fn = resolve(recipe["loss_fn"], "loss_fn")
    return model, data, loss_fn


def _optimizer(model: nn.Module, train: dict) -> torch.optim.Optimizer:
    params = model.parameters()
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"],
                               weight_decay=train["weight_decay"])
    cls = torch.optim.Adam if train["optimizer"] == "adam" else torch.optim.AdamW
    return cls(params, lr=train["lr"], weight_decay=train["weight_decay"])


def _need(data, loss_fn, workflow: str):
    if data is None or loss_fn is None:
        raise RecipeError(f"workflow {workflow!r} needs data: and loss_fn: (package.module:name)")


def _train_loop(model, data, loss_fn, train, before_step, step):
    batches = itertools.cycle(list(data))
    model.train()
    for _ in range(train["steps"]):
        before_step()
        loss = loss_fn(model, next(batches))
        loss.backward()
        step()


def _write_common(out: str, model: nn.Module, masks, report: dict) -> list[str]:
    files = {"pruned_model.pt": lambda t: torch.save(model.state_dict(), t),
             "masks.pt": lambda t: torch.save(masks.state_dict(), t),
             "report.json": _json_writer(report)}
    write_file_set(out, files)  # one set: a failure leaves the previous outputs as they were
    return list(files)


def _json_writer(obj: dict):
    def write(t):
        with open(t, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, default=str)
    return write


def run_recipe(recipe: dict, base_dir: str = ".", verbose: bool = True, overwrite: bool = False) -> dict:
    """Run a validated recipe; returns its report (also written to ``output/report.json``).

    ``output`` defaults to ``<recipe file name>-out`` next to the recipe (``gradprune-<workflow>-out``
    for a recipe given as a mapping). An earlier run there is kept: a ``RecipeError`` naming the
    folder is raised before any work unless ``overwrite`` (``--overwrite``). The report's text and
    the files written are logged (``logging``, logger ``gradprune.recipes``) when ``verbose``.
    """
    report, text, out, files = _run_recipe(recipe, base_dir, overwrite)
    if verbose:
        logger.info("%s", text)
        logger.info("wrote %s", ", ".join(os.path.join(out, f) for f in files))
    return report


_OUTPUTS = {"prune": ("pruned_model.pt", "masks.pt", "report.json"),
            "gradual": ("pruned_model.pt", "masks.pt", "report.json"),
            "sparse": ("pruned_model.pt", "masks.pt", "report.json"),
            "search": ("pruned", "report.json"), "preprune": ("selection.pt", "report.json"),
            "llm_structured": ("pruned", "report.json", "report.md", "widths.png")}


def _output_folder(recipe: dict, base_dir: str = ".") -> str:
    """Where ``recipe`` writes: its ``output`` (default ``gradprune-<workflow>-out``) under ``base_dir``."""
    return os.path.join(base_dir, recipe.get("output") or f"gradprune-{recipe['workflow']}-out")


def _run_recipe(recipe: dict, base_dir: str, overwrite: bool = False) -> tuple[dict, str, str, list[str]]:
    """Run a validated recipe: ``(report, report text, output folder, files written there)``."""
    workflow = recipe["workflow"]
    out = _output_folder(recipe, base_dir)
    earlier = [f for f in _OUTPUTS[workflow] if os.path.exists(os.path.join(out, f))]
    if earlier and not overwrite:
        raise RecipeError(f"output folder {out} holds an earlier run ({', '.join(earlier)}); "
                          f"pass --overwrite (overwrite=True) to replace it, or set output: to another folder")
    model, data, loss_fn = _build(recipe, base_dir)
    report: dict = {"workflow": workflow}
    if workflow == "prune":
        from .prune import prune

        res = prune(model, recipe["prune"], data=data, loss_fn=loss_fn, n_batches=recipe.get("n_batches"))
        report.update(res.report.to_dict(), config=res.config.to_dict())
        text = str(res.report)
        files = _write_common(out, model, res.masks, report)
    elif workflow == "gradual":
        from .pruner import Pruner

        _need(data, loss_fn, workflow)
        opt = _optimizer(model, recipe["train"])
        pruner = Pruner(model, recipe["prune"], optimizer=opt)

        def step():
            pruner.on_before_optimizer_step()
            opt.step()
            pruner.on_after_optimizer_step()

        _train_loop(model, data, loss_fn, recipe["train"], lambda: (pruner.on_step_begin(), opt.zero_grad()), step)
        rep = pruner.report
        report.update(rep.to_dict(), config=recipe["prune"].to_dict(), steps=pruner.step)
        text = str(rep)
        files = _write_common(out, model, pruner.masks, report)
    elif workflow == "sparse":
        from .sparse_training import SparseTrainer

        _need(data, loss_fn, workflow)
        opt = _optimizer(model, recipe["train"])
        sparse = SparseTrainer(model, opt, recipe["sparse"])
        _train_loop(model, data, loss_fn, recipe["train"], opt.zero_grad, sparse.step)
        rep = sparse.report
        report.update(rep.to_dict(), updates=sparse.updates, steps=sparse.step_count,
                      config={k: v for k, v in recipe["sparse"].to_dict().items() if not callable(v)})
        text = str(rep)
        files = _write_common(out, model, sparse.masks, report)
    elif workflow == "search":
        from .structured import save_pruned, search

        sec = recipe["search"]
        example = resolve(sec["example_input"], "search.example_input")
        example = example() if callable(example) else example
        kwargs = {k: sec[k] for k in ("rules", "max_iter_data_loader") if k in sec}
        found = search(model, sec["constraints"], data=data, loss_fn=loss_fn, method=sec["method"],
                       example_input=example, **kwargs)
        small = found.export()
        text = str(found.report)
        report.update(search=text, constraints=sec["constraints"], method=sec["method"],
                      params=sum(p.numel() for p in small.parameters()))
        write_file_set(out, {"pruned": lambda t: save_pruned(small, t), "report.json": _json_writer(report)})
        files = ["pruned/", "report.json"]
    elif workflow == "llm_structured":
        from .llm_structured import run as run_llm

        heldout = None
        if recipe.get("eval_data"):
            heldout = resolve(recipe["eval_data"], "eval_data")
            heldout = heldout() if callable(heldout) else heldout
            if not isinstance(heldout, torch.Tensor) or heldout.dim() != 2:
                raise RecipeError(f"eval_data: {recipe['eval_data']} must give a 2-D tensor of token ids "
                                  f"[n, T], got {type(heldout).__name__}")
        example = None
        if recipe["llm"].get("example_input"):
            example = resolve(recipe["llm"]["example_input"], "llm.example_input")
            example = example() if callable(example) else example
        writers: dict = {}
        rep_, text = run_llm(model, data, recipe["llm"], writers, loss_fn=loss_fn, heldout=heldout,
                             example_input=example)
        report.update(rep_)
        write_file_set(out, writers)
        files = [f + "/" if f == "pruned" else f for f in writers]
    else:  # preprune
        from .preprune import pre_prune

        if data is None or loss_fn is None:
            raise RecipeError("workflow 'preprune' needs data: (a dataset of dict items) and loss_fn:")
        sel = pre_prune(model, data, recipe["preprune"], loss_fn)
        report.update({k: v for k, v in sel.report.to_dict().items() if k not in ("kind", "layers")},
                      config={k: v for k, v in recipe["preprune"].to_dict().items()
                              if k not in ("dataset", "mask")})
        text = str(sel.report)
        write_file_set(out, {"selection.pt": lambda t: torch.save(
            {"indices": sel.indices, "masks": sel.masks.state_dict()}, t), "report.json": _json_writer(report)})
        files = ["selection.pt", "report.json"]
    return report, text, out, files
