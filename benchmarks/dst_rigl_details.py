#!/usr/bin/env python
"""Where does the MLP gap between gradprune's RigL and rigl-torch's come from? (an experiment,
not a test, not a feature)

``dst_vs_peers.py``'s like-for-like row (gradprune RigL with rigl-torch's allocation) trails
rigl-torch by ~0.006 at 90% on the MLP over 30 seeds. The implementations still differ in three
details listed in that benchmark's notes. This script runs the same benchmark with one extra
method, ``gp_rigl_matched``: gradprune's RigL with all three matched to rigl-torch by patching
the trainer in this process only:

- the update happens one step earlier (rigl-torch's steps 99, 199, ...: it counts its own call;
  gradprune updates after ``update_interval`` optimizer steps),
- the drop count is floor(f · n_active) (gradprune rounds half up),
- ``regrow_dropped=True`` (a library option: growth among everything inactive after the drop).

If the paired difference to rigl-torch vanishes, the gap lies in these details, not in a defect.

Usage (arguments as for ``dst_vs_peers.py``; ``--merge`` works too):
    .dst-venv/bin/python benchmarks/dst_rigl_details.py --models mlp \\
        --methods gp_rigl_matched rigl_torch --seeds 0 1 2 --extended 0 --out STEM
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dst_vs_peers as dst  # noqa: E402
import gradprune.sparse_training as st  # noqa: E402

_is_update_step = st.SparseTrainer.is_update_step
_drop_and_grow = st.SparseTrainer._drop_and_grow
_init = st.SparseTrainer.__init__


def is_update_step(self, step=None):
    """rigl-torch's timing: the update comes one optimizer step earlier."""
    if not getattr(self, "_matched", False):
        return _is_update_step(self, step)
    return _is_update_step(self, (self.step_count if step is None else step) + 1)


def drop_and_grow(self, fraction):
    """rigl-torch's drop count: floor(f * n_active) instead of rounding half up."""
    if not getattr(self, "_matched", False):
        return _drop_and_grow(self, fraction)
    saved = st.round_half_up
    st.round_half_up = lambda x: int(math.floor(x))
    try:
        return _drop_and_grow(self, fraction)
    finally:
        st.round_half_up = saved


def init(self, model, optimizer, config, *args, **kwargs):
    _init(self, model, optimizer, config, *args, **kwargs)
    # only the trainers of the gp_rigl_matched method (the only ones with regrow_dropped here)
    self._matched = bool(config.regrow_dropped)


def gp_config(key, density, steps, interval, seed, _base=dst.gp_config):
    if key == "gp_rigl_matched":
        return _base("gp_rigl_uniform_dfl_regrow", density, steps, interval, seed)
    return _base(key, density, steps, interval, seed)


st.SparseTrainer.is_update_step = is_update_step
st.SparseTrainer._drop_and_grow = drop_and_grow
st.SparseTrainer.__init__ = init
dst.METHODS["gp_rigl_matched"] = ("gradprune RigL, rigl-torch's allocation, update timing, floor drop count "
                                  "and regrowth (experiment)", "gradprune")
dst.SPARSE_METHODS.append("gp_rigl_matched")
dst.gp_config = gp_config

if __name__ == "__main__":
    if "gp_rigl_uniform_dfl_regrow" in sys.argv:  # its trainers would be patched too
        sys.exit("dst_rigl_details.py: run gp_rigl_uniform_dfl_regrow with dst_vs_peers.py instead")
    dst.main(sys.argv[1:])
