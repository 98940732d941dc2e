"""``gradprune demo``: one-shot pruning of a small CNN on scikit-learn's digits, end to end.

Trains a small CNN on the 8x8 digits (1,797 images, 10 classes; bundled with scikit-learn, no
download), then for every criterion x pattern x sparsity prunes a copy one-shot, fine-tunes it
briefly with the masks enforced, and records test accuracy. The dense baseline it is compared with
is trained for the same extra fine-tuning steps (same optimizer, learning rate and batches), so
the comparison is fair: ``steps`` in the results counts them. Writes ``results.json``,
``accuracy_vs_sparsity.png`` (when matplotlib is installed) and ``best_model.pt`` (the best run:
the most accurate after fine-tuning among the runs at the highest target sparsity; a dict of
tensors and plain values that loads with ``torch.load(..., weights_only=True)``).

Example (a very small grid; the full demo is ``gradprune demo``):
    >>> import tempfile
    >>> from gradprune.demo import run_demo
    >>> with tempfile.TemporaryDirectory() as out:
    ...     res = run_demo(out, criteria=("magnitude",), patterns=("1x1",), sparsities=(0.5,),
    ...                    epochs=1, finetune_epochs=1, verbose=False)
    >>> sorted(res)[:3]
    ['best', 'config', 'dense_accuracy']
    >>> res["steps"]["dense_finetune"] == res["runs"][0]["finetune_steps"] == res["steps"]["finetune"]
    True
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Sequence

import torch
from torch import nn

from .config import atomic_write, parse_pattern
from .prune import prune
from ._progress import progress
from .report import PRUNABLE, series_style

logger = logging.getLogger(__name__)

__all__ = ["run_demo", "make_cnn", "load_digits_tensors", "DEFAULT_CRITERIA", "DEFAULT_PATTERNS",
           "DEFAULT_SPARSITIES"]

DEFAULT_CRITERIA = ("magnitude", "snip", "taylor", "fisher", "random")
DEFAULT_PATTERNS = ("1x1", "4x1", "2:4")
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95)


def make_cnn() -> nn.Module:
    """The demo's CNN: three 3x3 convolutions and two linear layers (about 36k weights)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def load_digits_tensors(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` from scikit-learn's digits, an 80/20 seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("gradprune demo needs scikit-learn: pip install 'gradprune[demo]'") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _batches(x, y, batch_size, seed):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[perm[i:i + batch_size]], y[perm[i:i + batch_size]]) for i in range(0, len(y), batch_size)]


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


BEST_RULE = "the most accurate after fine-tuning among the runs at the highest target sparsity"


def _train(model, x, y, epochs, lr, seed, masks=None) -> int:
    """Train ``model`` in place; returns the number of optimizer steps taken."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    handle = masks.attach(opt) if masks is not None else None
    model.train()
    steps = 0
    for epoch in range(epochs):
        for batch in _batches(x, y, 64, seed * 1000 + epoch):
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()
            steps += 1
    if handle is not None:
        handle.remove()
    return steps


@torch.no_grad()
def _accuracy(model, x, y):
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def _grid(patterns, sparsities):
    for pattern in patterns:
        kind, n, m = parse_pattern(pattern)
        if kind == "nm":
            yield pattern, (m - n) / m  # an N:M pattern has one sparsity: its own ratio
        else:
            for s in sparsities:
                yield pattern, s


def run_demo(
    out_dir: str = "gradprune-out",
    *,
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    epochs: int = 15,
    finetune_epochs: int = 2,
    n_batches: int = 8,
    scope: str = "global",
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Run the demo and write its outputs to ``out_dir``; returns the results dict."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_tensors(seed)
    dense = make_cnn()
    pretrain_steps = _train(dense, x_tr, y_tr, epochs, 1e-2, seed)
    dense_pretrained_acc = _accuracy(dense, x_te, y_te)
    # the fair baseline: the dense model trained for the same extra steps the pruned ones get
    baseline = copy.deepcopy(dense)
    dense_finetune_steps = _train(baseline, x_tr, y_tr, finetune_epochs, 2e-3, seed + 1)
    dense_acc = _accuracy(baseline, x_te, y_te)
    del baseline
    if verbose:
        logger.info("dense CNN: test accuracy %.4f after %d steps, %.4f after %d more (the baseline; "
                    "%d train / %d test digits)", dense_pretrained_acc, pretrain_steps, dense_acc,
                    dense_finetune_steps, len(y_tr), len(y_te))

    calib = _batches(x_tr, y_tr, 64, seed + 12345)
    runs = [(c, p, s) for c in criteria for p, s in _grid(patterns, sparsities)]
    results = []
    best = None
    bar = progress(total=len(runs), desc="prune + fine-tune", enable=None if verbose else False)
    import warnings

    for crit, pattern, sparsity in runs:
        model = copy.deepcopy(dense)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = prune(model, criterion=crit, pattern=pattern, sparsity=sparsity,
                        scope=scope if parse_pattern(pattern)[0] != "nm" else "local",
                        data=calib, loss_fn=_loss, n_batches=n_batches, seed=seed,
                        show_progress=False)
        one_shot = _accuracy(model, x_te, y_te)
        finetune_steps = _train(model, x_tr, y_tr, finetune_epochs, 2e-3, seed + 1, masks=res.masks)
        acc = _accuracy(model, x_te, y_te)
        row = {"criterion": crit, "pattern": pattern, "target_sparsity": sparsity,
               "sparsity": res.masks.sparsity(), "accuracy_one_shot": one_shot,
               "accuracy": acc, "finetune_steps": finetune_steps,
               "skipped": [str(w.message) for w in caught]}
        results.append(row)
        if best is None or (sparsity, acc) > (best[0]["target_sparsity"], best[0]["accuracy"]):
            best = (row, model, res.masks)
        bar.update(1)
    bar.close()

    os.makedirs(out_dir, exist_ok=True)
    summary = {
        "dense_accuracy": dense_acc,
        "dense_accuracy_before_finetune": dense_pretrained_acc,
        "steps": {"pretrain": pretrain_steps, "dense_finetune": dense_finetune_steps,
                  "finetune": max(r["finetune_steps"] for r in results)},
        "runs": results,
        "best": dict({k: best[0][k] for k in ("criterion", "pattern", "sparsity", "accuracy")},
                     rule=BEST_RULE),
        "config": {"criteria": list(criteria), "patterns": list(patterns),
                   "sparsities": list(sparsities), "epochs": epochs,
                   "finetune_epochs": finetune_epochs, "n_batches": n_batches, "scope": scope,
                   "seed": seed},
        "seconds": round(time.perf_counter() - start, 2),
    }

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)

    atomic_write(os.path.join(out_dir, "results.json"), write_json)
    atomic_write(os.path.join(out_dir, "best_model.pt"), lambda tmp: torch.save(
        {"model": best[1].state_dict(), "masks": best[2].state_dict(),
         "criterion": best[0]["criterion"], "pattern": best[0]["pattern"],
         "sparsity": best[0]["sparsity"], "accuracy": best[0]["accuracy"]}, tmp))
    plot = _plot(summary, os.path.join(out_dir, "accuracy_vs_sparsity.png"))
    summary["files"] = [os.path.join(out_dir, f) for f in ("results.json", "best_model.pt")] + (
        [plot] if plot else [])
    return summary


def format_summary(summary: dict) -> str:
    """What ``gradprune demo`` prints: the accuracy table, the best run and the files written."""
    best = summary["best"]
    return "\n".join([
        format_results(summary),
        f"best ({best.get('rule', BEST_RULE)}): {best['criterion']} {best['pattern']} at sparsity "
        f"{best['sparsity']:.4f} of {PRUNABLE}: accuracy {best['accuracy']:.4f}",
        f"wrote {', '.join(summary['files'])} in {summary['seconds']:.1f}s"])


def format_results(summary: dict) -> str:
    """Accuracy table: one row per criterion x pattern, one column per sparsity."""
    from ._table import format_table

    levels = sorted({r["target_sparsity"] for r in summary["runs"]})
    cols = ["criterion", "pattern"] + [f"{s:.0%}" for s in levels]
    rows = {}
    for r in summary["runs"]:
        row = rows.setdefault((r["criterion"], r["pattern"]),
                              {"criterion": r["criterion"], "pattern": r["pattern"]})
        row[f"{r['target_sparsity']:.0%}"] = f"{r['accuracy']:.3f}"
    steps = summary.get("steps")
    extra = f", the same {steps['dense_finetune']} extra steps" if steps else ""
    head = (f"test accuracy after one-shot pruning + fine-tuning (dense{extra}: "
            f"{summary['dense_accuracy']:.3f})")
    return head + "\n" + format_table(list(rows.values()), cols)


def _plot(summary: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in ((axes[0], "accuracy_one_shot", "one-shot"),
                           (axes[1], "accuracy", "after fine-tuning")):
        groups = {}
        for r in summary["runs"]:
            groups.setdefault((r["criterion"], r["pattern"]), []).append(r)
        for i, ((crit, pattern), rs) in enumerate(groups.items()):
            rs = sorted(rs, key=lambda r: r["sparsity"])
            ax.plot([r["sparsity"] for r in rs], [r[key] for r in rs], label=f"{crit} {pattern}",
                    markersize=5, **series_style(i))
        ax.axhline(summary["dense_accuracy"], color="k", lw=0.8, label="dense (same extra steps)")
        ax.set_title(title)
        ax.set_xlabel(f"sparsity of {PRUNABLE}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (digits)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
