"""How every search result reports its measured latencies (one formatting for all axes).

A search result of any axis (:class:`~gradprune.structured.search.SearchResult`, or the
single-axis :class:`~gradprune.structured.depth.LayerSearchResult`,
:class:`~gradprune.structured.hidden.HiddenSearchResult` and
:class:`~gradprune.structured.experts.ExpertSearchResult`) may carry

* ``latency_ms``: ``{"dense": {bs: ms}, "pruned": {bs: ms}, "repeats": n}`` from
  ``measure_latency=True`` (:meth:`~gradprune.structured.search.SearchResult.latency`);
* ``latency_search`` / ``decode_latency_search``: the measurement a ``latency`` /
  ``decode_latency`` constraint was checked on (see
  :class:`~gradprune.structured.search.LatencyProbe`).

:func:`latency_lines` formats them for the report text and :func:`latency_extra` for its
``to_dict()``; a result without them gets no lines.

Example::

    >>> from types import SimpleNamespace
    >>> found = SimpleNamespace(latency_ms={"dense": {1: 2.0}, "pruned": {1: 1.0}, "repeats": 5})
    >>> latency_lines(found)
    ['latency batch 1: 2.000 ms -> 1.000 ms (50.0%; CPU median of 5 runs)']
    >>> latency_extra(found)["latency_search"]
    {}
"""

from __future__ import annotations

__all__ = ["MEASURED_KEYS", "latency_lines", "latency_extra"]

MEASURED_KEYS = ("latency", "decode_latency")  # measured (ms), not counted: see LatencyProbe


def latency_lines(found) -> list:
    """Report lines of the measured bounds (``latency_search``, ``decode_latency_search``) and
    of ``measure_latency=True`` (``latency_ms``) of any search result."""
    lines = []
    lat = getattr(found, "latency_ms", None)
    if lat:
        for bs in lat["dense"]:
            d, p = lat["dense"][bs], lat["pruned"][bs]
            lines.append(f"latency batch {bs}: {d:.3f} ms -> {p:.3f} ms ({p / max(d, 1e-12):.1%}; "
                         f"CPU median of {lat['repeats']} runs)")
    for key in MEASURED_KEYS:
        ls = getattr(found, f"{key}_search", None)
        if not ls:
            continue
        bound = (f"{ls['bound_ratio']:.1%} of dense" if ls["bound_ratio"] is not None
                 else f"{ls['bound_ms']:.3f} ms")
        what = (f"decode latency constraint (batch 1, ms per token over {ls['decode_steps']} cached steps "
                f"after a {ls['prompt_tokens']}-token prefill, measured)" if key == "decode_latency"
                else f"latency constraint (batch {ls['batch_size']}, measured)")
        lines.append(f"{what}: {ls['dense_ms']:.3f} ms -> {ls['pruned_ms']:.3f} ms "
                     f"({ls['pruned_ms'] / max(ls['dense_ms'], 1e-12):.1%}; bound {bound}; "
                     f"{ls['candidates_timed']} candidates timed, median of {ls['repeats']} interleaved runs)")
    return lines


def latency_extra(found) -> dict:
    """The same measurements for a report's ``to_dict()`` (``{}`` where none was taken)."""
    return {"latency_ms": getattr(found, "latency_ms", None) or {},
            **{f"{key}_search": getattr(found, f"{key}_search", None) or {} for key in MEASURED_KEYS}}
