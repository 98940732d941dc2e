"""Report objects: one API for every result and every stateful object that has a report.

The convention: ``.report`` is a read-only attribute (a property on :class:`~gradprune.Pruner`,
:class:`~gradprune.SparseTrainer` and :class:`~gradprune.SearchResult`, a field on
:class:`~gradprune.PruneResult` and :class:`~gradprune.PrePruneSelection`) holding a report object.
Every report object has ``str(rep)`` (the table), ``rep.to_dict()`` (JSON-serialisable),
``rep.to_markdown()`` and ``rep.plot(path=None, ax=None)`` (matplotlib, imported when called).

The attribute was chosen over a ``report()`` method because the most used results
(``gp.prune``'s and ``gp.pre_prune``'s) already had an attribute: only the ``report()`` calls of
``Pruner``, ``SparseTrainer`` and ``SearchResult`` change. Those old spellings keep working: calling
a report object warns ``DeprecationWarning`` and returns what the method returned (the object itself;
``SearchResult``'s the text), and ``PrePruneSelection.report["key"]`` still reads the old dict
(with a ``DeprecationWarning``; use the attribute ``sel.report.key``).

This module sits below every workflow (it imports only ``_table`` and, when plotting,
``matplotlib``); :mod:`gradprune.report` re-exports it next to the ``gradprune report`` command's
helpers.

Example:
    >>> import torch.nn as nn
    >>> import gradprune as gp
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> rep = gp.prune(model, sparsity=0.5, criterion="magnitude").report
    >>> [r["name"] for r in rep.rows]
    ['0.weight', '2.weight']
    >>> rep.to_dict()["overall_counts"]
    'prunable weights (the masked tensors)'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Sequence

from ._table import _cell, format_table

__all__ = ["Report", "SparsityReport", "SelectionReport", "SearchReport", "PRUNABLE", "ALL_WEIGHTS",
           "series_style", "format_overall", "density_panel"]

#: what each overall line counts
PRUNABLE = "prunable weights (the masked tensors)"
ALL_WEIGHTS = "all weight tensors (2-D and up)"

_MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # 7 markers, coprime with tab20's 20 colours


def series_style(i: int) -> dict:
    """Colour, marker and line style of the ``i``-th series of a plot: 20 distinct colours (tab20)
    and a marker cycle of 7, so 140 series differ in colour or marker and the first 20 in both.

    Example:
        >>> from gradprune.report import series_style
        >>> series_style(0)["marker"], series_style(1)["marker"]
        ('o', 's')
    """
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    # even entries first (the strong colours), then the light ones
    colour = cmap(((i % 20) * 2) % 20 + (i % 20) // 10)
    return {"color": colour, "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": ("-", "--", ":", "-.")[(i // 20) % 4]}


def format_overall(what: str, sparsity: float, zeros: int | None = None, total: int | None = None) -> str:
    """One overall line that says what it counts, e.g. for ``what=PRUNABLE``:
    ``overall sparsity of prunable weights (the masked tensors): 0.9500 (950 of 1,000 entries zero)``.

    Example:
        >>> from gradprune.report import format_overall, ALL_WEIGHTS
        >>> format_overall(ALL_WEIGHTS, 0.5, 2, 4)
        'overall sparsity of all weight tensors (2-D and up): 0.5000 (2 of 4 entries zero)'
    """
    text = f"overall sparsity of {what}: {sparsity:.4f}"
    if zeros is not None and total is not None:
        text += f" ({zeros:,} of {total:,} entries zero)"
    return text


def density_panel(ax, names: Sequence[str], densities: Sequence[float], title: str, xlabel: str) -> None:
    """Draw one bar per layer (its density) into ``ax``, each layer a series of its own colour and
    marker (:func:`series_style`), layer names on the y axis, ``title`` on top.

    Example: ``density_panel(ax, ["0.weight"], [0.5], "per-layer density", "kept fraction")``."""
    ys = range(len(names))
    styles = [series_style(i) for i in ys]
    ax.barh(list(ys), list(densities), color=[s["color"] for s in styles], alpha=0.35, height=0.7)
    for i, (name, d) in enumerate(zip(names, densities)):
        ax.plot([d], [i], linestyle="none", marker=styles[i]["marker"], color=styles[i]["color"],
                markersize=6, label=name, clip_on=False)  # a marker at 0 stays visible
    ax.set_yticks(list(ys), list(names), fontsize=7)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)


def _jsonable(v: Any) -> Any:
    """``v`` with tuples as lists, mapping keys as str and anything exotic as its str: what
    ``json.loads(json.dumps(v))`` gives back unchanged."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:  # a 0-d tensor
        return v.item()
    return str(v)


def _md_cell(v: Any) -> str:
    return _cell(v).replace("|", "\\|")


class Report:
    """A per-layer (or per-group) table with a few summary lines.

    ``rows``: list of dicts (one per layer); ``columns``: the columns shown; ``kind``: what made
    it; ``lines``: the summary lines printed under the table. Subclasses set these.

    Example:
        >>> from gradprune._report import Report
        >>> rep = Report("example", [{"name": "a", "density": 0.5}], ("name", "density"), ["one line"])
        >>> print(rep)
        name  density
        ----  -------
        a     0.5000
        one line
    """

    #: the label of each row on a plot's y axis, and the density plotted
    name_key = "name"

    def __init__(self, kind: str, rows: list, columns: Sequence[str], lines: Sequence[str] = (),
                 extra: Mapping | None = None):
        self.kind = kind
        self.rows = rows
        self.columns = tuple(columns)
        self.lines = list(lines)
        self.extra = dict(extra or {})

    # -- the one API ---------------------------------------------------------------------------
    def __str__(self) -> str:
        return "\n".join([format_table(self.rows, self.columns)] + self.lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_markdown_(self) -> str:  # Jupyter shows the Markdown table
        return self.to_markdown()

    def to_dict(self) -> dict:
        """The report as plain JSON types: ``kind``, ``layers`` (the rows) and the summary fields."""
        out = {"kind": self.kind, "layers": [_jsonable(r) for r in self.rows]}
        out.update(_jsonable(self.extra))
        return out

    def to_markdown(self) -> str:
        """A Markdown table (a header row, one row per layer) followed by the summary lines."""
        out = ["| " + " | ".join(self.columns) + " |", "|" + "|".join("---" for _ in self.columns) + "|"]
        out += ["| " + " | ".join(_md_cell(r.get(c)) for c in self.columns) + " |" for r in self.rows]
        if self.lines:
            out += [""] + [f"{line}  " for line in self.lines]
        return "\n".join(out)

    def densities(self) -> list[float]:
        """The kept fraction of each row (what :meth:`plot` draws)."""
        return [float(r.get("density", 1.0 - r.get("sparsity", 0.0))) for r in self.rows]

    def plot_title(self) -> str:
        return f"{self.kind}: per-layer density"

    def plot(self, path=None, ax=None):
        """Draw the per-layer densities: one bar and marker per layer, each its own colour and
        marker (readable with 15+ layers), the panel titled with what the overall line counts.

        ``ax`` given: draw into it and return it. Otherwise a new figure: with ``path``, saved there
        as PNG (returns ``path``), else returned (a ``matplotlib.figure.Figure``, not registered
        with pyplot). matplotlib is imported here, not when gradprune is.

        Example: ``pruner.report.plot("sparsity.png")``."""
        if path is not None and not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("Report.plot needs matplotlib: pip install matplotlib") from exc
        names = [str(r.get(self.name_key)) for r in self.rows]
        fig = None
        if ax is None:
            fig = Figure(figsize=(7.0, max(3.0, 0.22 * len(names) + 1.2)))
            ax = fig.add_subplot(1, 1, 1)
        density_panel(ax, names, self.densities(), self.plot_title(), "density (kept fraction)")
        if path is None:
            return ax if fig is None else fig
        fig = ax.figure
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        return path

    # -- the old spellings -------------------------------------------------------------------------
    def _legacy(self):
        return self

    def __call__(self):
        """Deprecated: ``obj.report()`` -> use the attribute ``obj.report``."""
        warnings.warn("report() is deprecated: .report is now an attribute holding the report "
                      "(print it, or call to_dict(), to_markdown(), plot())", DeprecationWarning, stacklevel=2)
        return self._legacy()


def _mask_counts(masks) -> list:
    """``[(name, shape, kept, numel)]`` per mask: a MaskSet counts sharded (FSDP2) masks over
    every rank (the whole weight's shape); a plain mapping counts its tensors."""
    counts = masks.layer_counts() if hasattr(masks, "layer_counts") else {
        n: (int(m.sum()), m.numel()) for n, m in masks.items()}
    shards = getattr(masks, "row_shards", {})
    return [(n, tuple(shards[n].shape) if n in shards else tuple(m.shape), *counts[n])
            for n, m in masks.items()]


class SparsityReport(Report):
    """Per-layer table of what a mask set removed (``str(report)`` prints it).

    ``rows`` is a list of dicts with ``name``, ``shape``, ``numel``, ``kept``, ``sparsity``,
    ``density`` and ``note`` (why a layer was skipped); ``overall`` is the sparsity over the
    prunable weights (the masked tensors; skipped layers are not counted), and the printed
    overall line says so.

    Example:
        >>> import torch.nn as nn
        >>> import gradprune as gp
        >>> masks = gp.MaskSet(nn.Sequential(nn.Linear(4, 4)))
        >>> print(gp.SparsityReport(masks).lines[0])
        overall sparsity of prunable weights (the masked tensors): 0.0000 (0 of 16 entries zero)
    """

    def __init__(self, masks, skipped: Mapping[str, str] | None = None, shapes: Mapping | None = None):
        rows = []
        for n, shape, kept, numel in _mask_counts(masks):
            rows.append({"name": n, "shape": shape, "numel": numel, "kept": kept,
                         "sparsity": 1.0 - kept / numel if numel else 0.0,
                         "density": kept / numel if numel else 0.0, "note": ""})
        for n, why in (skipped or {}).items():
            shape = tuple((shapes or {}).get(n, ()))
            numel = math.prod(int(s) for s in shape) if shape else 0
            rows.append({"name": n, "shape": shape, "numel": numel, "kept": numel,
                         "sparsity": 0.0, "density": 1.0, "note": f"skipped: {why}"})
        total = sum(r["numel"] for r in rows if not r["note"])
        zeros = total - sum(r["kept"] for r in rows if not r["note"])
        self.overall = masks.sparsity()
        super().__init__("sparsity", rows, ("name", "shape", "numel", "kept", "sparsity", "note"),
                         [format_overall(PRUNABLE, self.overall, zeros, total)],
                         {"overall": self.overall, "overall_counts": PRUNABLE, "zeros": zeros, "total": total})

    def plot_title(self) -> str:
        return f"per-layer density; overall sparsity of {PRUNABLE}: {self.overall:.3f}"


class SelectionReport(Report):
    """What :func:`~gradprune.pre_prune` kept: one row per parameter (``kept`` of ``numel``) and
    the run's counts as attributes: ``kept`` ({name: n}), ``kept_total``, ``total``, ``samples``,
    ``samples_per_class``, ``filled_with_replacement``, ``backward_passes``, ``cache``, ``seconds``.

    ``report["kept_total"]`` (the dict this used to be) still works with a ``DeprecationWarning``.

    Example:
        >>> import torch.nn as nn
        >>> import gradprune as gp
        >>> masks = gp.MaskSet(nn.Sequential(nn.Linear(2, 2)))
        >>> rep = SelectionReport(masks, {"kept_total": 4, "total": 4})
        >>> rep.kept_total, rep.to_dict()["total"]
        (4, 4)
    """

    FIELDS = ("kept", "kept_total", "total", "samples", "samples_per_class", "filled_with_replacement",
              "backward_passes", "cache", "seconds")

    def __init__(self, masks, stats: Mapping):
        self._stats = dict(stats)
        rows = []
        for n, shape, kept, numel in _mask_counts(masks):
            rows.append({"name": n, "shape": shape, "numel": numel, "kept": kept,
                         "density": kept / numel if numel else 0.0})
        total = self._stats.get("total", sum(r["numel"] for r in rows))
        kept_total = self._stats.get("kept_total", sum(r["kept"] for r in rows))
        lines = [f"kept {kept_total:,} of {total:,} entries of the scored parameters "
                 f"({kept_total / total if total else 0.0:.4%})"]
        if "samples" in self._stats:
            lines.append(f"{self._stats['samples']} samples {self._stats.get('samples_per_class')}, "
                         f"{self._stats.get('backward_passes')} backward passes, cache: {self._stats.get('cache')}, "
                         f"{self._stats.get('seconds', 0.0):.2f} s")
        super().__init__("selection", rows, ("name", "shape", "numel", "kept", "density"), lines, self._stats)

    def __getattr__(self, name):
        stats = self.__dict__.get("_stats", {})
        if name in stats:
            return stats[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def plot_title(self) -> str:
        kept_total, total = self._stats.get("kept_total", 0), self._stats.get("total", 0)
        return f"pre-pruning selection: kept fraction per parameter ({kept_total:,} of {total:,} entries kept)"

    # the dict this used to be: read with a DeprecationWarning
    def _old_dict(self) -> dict:
        warnings.warn("PrePruneSelection.report is a SelectionReport now: read report.kept_total (or "
                      "report.to_dict()['kept_total']) instead of report['kept_total']",
                      DeprecationWarning, stacklevel=3)
        return self._stats

    def __getitem__(self, key):
        return self._old_dict()[key]

    def __contains__(self, key) -> bool:
        return key in self._old_dict()

    def __iter__(self):
        return iter(self._old_dict())

    def __len__(self) -> int:
        return len(self._old_dict())

    def __bool__(self) -> bool:
        return True

    def get(self, key, default=None):
        return self._old_dict().get(key, default)

    def keys(self):
        return self._old_dict().keys()

    def items(self):
        return self._old_dict().items()

    def values(self):
        return self._old_dict().values()


class SearchReport(Report):
    """What :func:`~gradprune.search` found: one row per group (``group``, ``unit``, ``modules``,
    ``width``, ``kept``, ``choices``), then params and FLOPs of the dense model and of the subnet
    (and latency when measured), and the modules not pruned. ``found.report`` (the old method)
    returns this text with a ``DeprecationWarning``.

    Example: ``print(gp.search(model, {"flops": "50%"}, data, loss_fn, example_input=x).report)``."""

    name_key = "group"

    def __init__(self, rows: list, lines: Sequence[str], extra: Mapping):
        for r in rows:
            r.setdefault("density", r["kept"] / r["width"] if r["width"] else 0.0)
        super().__init__("search", rows, ("group", "unit", "modules", "width", "kept", "choices"), lines, extra)

    def plot_title(self) -> str:
        p = self.extra.get("params", {})
        frac = p.get("subnet", 0) / max(p.get("dense", 1), 1)
        return f"structured search: kept fraction per group (params {frac:.1%} of dense)"

    def _legacy(self) -> str:
        return str(self)
