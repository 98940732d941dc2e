#!/usr/bin/env python
"""Where does the MLP gap between gradprune's RigL and rigl-torch's come from? (an experiment,
not a test, not a feature)

``dst_vs_peers.py``'s like-for-like row (gradprune RigL with rigl-torch's allocation) trailed
rigl-torch by ~0.006 at 90% on the MLP over 30 seeds when gradprune's RigL rounded the drop count
half up and grew disjointly. This script runs the same benchmark with one extra method,
``gp_rigl_matched``: gradprune's RigL with three details matched to rigl-torch:

- the update happens one step earlier (rigl-torch's steps 99, 199, ...: it counts its own call;
  gradprune updates after ``update_interval`` optimizer steps), by patching the trainer in this
  process only (for the trainers of this method alone),
- the drop count is floor(f · n_active) (``drop_rounding="floor"``, the RigL preset's default now),
- ``regrow_dropped=True`` (growth among everything inactive after the drop, the preset's default now).

If the paired difference to rigl-torch vanishes, the gap lies in these details, not in a defect.

Usage (arguments as for ``dst_vs_peers.py``; ``--merge`` works too):
    .dst-venv/bin/python benchmarks/dst_rigl_details.py --models mlp \\
        --methods gp_rigl_matched rigl_torch --seeds 0 1 2 --extended 0 --out STEM
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dst_vs_peers as dst  # noqa: E402
import gradprune.sparse_training as st  # noqa: E402

_is_update_step = st.SparseTrainer.is_update_step
_init = st.SparseTrainer.__init__
_MATCHED = []  # the configs built for gp_rigl_matched


def is_update_step(self, step=None):
    """rigl-torch's timing: the update comes one optimizer step earlier."""
    if not getattr(self, "_matched", False):
        return _is_update_step(self, step)
    return _is_update_step(self, (self.step_count if step is None else step) + 1)


def init(self, model, optimizer, config, *args, **kwargs):
    _init(self, model, optimizer, config, *args, **kwargs)
    self._matched = any(config is c for c in _MATCHED)  # only the trainers of the gp_rigl_matched method


def gp_config(key, density, steps, interval, seed, _base=dst.gp_config):
    if key == "gp_rigl_matched":
        cfg = _base("gp_rigl_uniform_dfl", density, steps, interval, seed).replace(
            drop_rounding="floor", regrow_dropped=True)
        _MATCHED.append(cfg)
        return cfg
    return _base(key, density, steps, interval, seed)


st.SparseTrainer.is_update_step = is_update_step
st.SparseTrainer.__init__ = init
dst.METHODS["gp_rigl_matched"] = ("gradprune RigL, rigl-torch's allocation, update timing, floor drop count "
                                  "and regrowth (experiment)", "gradprune")
dst.SPARSE_METHODS.append("gp_rigl_matched")
dst.gp_config = gp_config

if __name__ == "__main__":
    dst.main(sys.argv[1:])
