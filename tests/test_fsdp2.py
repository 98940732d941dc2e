"""FSDP2 (``fully_shard``, DTensor parameters sharded on dim 0) on 2 and 3 gloo CPU processes.

Every workflow takes the sharded model as it is. Each rank's masks hold only its rows; the test
process stacks the ranks' rows and compares them with a single-process run on the same global
batches (masks exactly; weights to float tolerance, since the reduce-scatter sums in another order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprune as gp
from test_distributed import _ce, _global_batches, _shard, run_ranks


def _fsdp2_available() -> bool:
    try:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_gloo_available()


pytestmark = pytest.mark.skipif(not _fsdp2_available(), reason="FSDP2 (fully_shard) with gloo is not available")

STEPS = 6


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))


def _shard_model(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def _local_masks(masks) -> dict:
    return {n: m.detach().cpu().clone() for n, m in masks.items()}


def _local_params(model) -> dict:
    from gradprune._distributed import local

    return {n: local(p.detach()).cpu().clone() for n, p in model.named_parameters()}


def _stack(results: list, key: str) -> dict:
    """The ranks' rows of every tensor, stacked in rank order (the whole tensor)."""
    return {n: torch.cat([r[key][n] for r in results]) for n in results[0][key]}


def _assert_equal_masks(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for n in a:
        assert torch.equal(a[n], b[n]), f"mask {n!r} differs from the single-process run"


def _assert_close(a: dict, b: dict) -> None:
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------------
# gradual pruning

PRUNE_CFG = dict(criterion="snip_momentum", pattern="4x1", scope="global", target_sparsity=0.5,
                 start_step=0, end_step=4, frequency=2)


def _pruner_loop(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = gp.Pruner(model, gp.PruneConfig(**PRUNE_CFG), optimizer=opt)
    for batch in batches:
        pruner.on_step_begin()
        opt.zero_grad()
        _ce(model, batch).backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()
    return pruner, opt


def _pruner_rank(rank, world):
    model = _shard_model(_mlp())
    torch.manual_seed(12345 + rank)  # anything random outside gradprune's generators differs per rank
    pruner, opt = _pruner_loop(model, _shard(_global_batches(STEPS, 12), rank, world))
    from gradprune._distributed import local

    zero = all(bool((local(p.detach())[~pruner.masks[n]] == 0).all()) for n, p in pruner.masks.params().items())
    return {"masks": _local_masks(pruner.masks), "params": _local_params(model),
            "sparsity": pruner.masks.sparsity(), "zero": zero}


@pytest.mark.parametrize("world", [2, 3])
def test_pruner_snip_momentum_4x1_global_matches_single_process(tmp_path, world):
    results = run_ranks(tmp_path, _pruner_rank, world=world)
    single = _mlp()
    pruner, _ = _pruner_loop(single, _global_batches(STEPS, 12))
    _assert_equal_masks(_stack(results, "masks"), _local_masks(pruner.masks))
    _assert_close(_stack(results, "params"), _local_params(single))
    assert all(r["sparsity"] == pruner.masks.sparsity() == 0.5 for r in results)
    assert all(r["zero"] for r in results)
