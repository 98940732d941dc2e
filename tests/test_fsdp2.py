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

    from gradprune.integrations.distributed import gather_masks

    zero = all(bool((local(p.detach())[~pruner.masks[n]] == 0).all()) for n, p in pruner.masks.params().items())
    return {"masks": _local_masks(pruner.masks), "params": _local_params(model),
            "sparsity": pruner.masks.sparsity(), "zero": zero, "whole": gather_masks(pruner.masks)}


@pytest.mark.parametrize("world", [2, 3])
def test_pruner_snip_momentum_4x1_global_matches_single_process(tmp_path, world):
    results = run_ranks(tmp_path, _pruner_rank, world=world)
    single = _mlp()
    pruner, _ = _pruner_loop(single, _global_batches(STEPS, 12))
    _assert_equal_masks(_stack(results, "masks"), _local_masks(pruner.masks))
    _assert_close(_stack(results, "params"), _local_params(single))
    assert all(r["sparsity"] == pruner.masks.sparsity() == 0.5 for r in results)
    assert all(r["zero"] for r in results)
    _assert_equal_masks(results[0]["whole"], _local_masks(pruner.masks))  # export: whole masks on rank 0
    assert all(r["whole"] is None for r in results[1:])


# ---------------------------------------------------------------------------------------------
# one-shot pruning

ONESHOT = [dict(criterion="snip", sparsity=0.7, scope="global"),
           dict(criterion="taylor", topk=0.3, threshold=1e-4, scope="global"),
           dict(criterion="magnitude", sparsity=0.5, pattern="2:4", scope="local"),
           dict(criterion="snip", sparsity=0.5, pattern="channel", scope="global", allocation="uniform")]


def _oneshot(model, batches, fields):
    return gp.prune(model, data=batches, loss_fn=_ce, **fields)


def _oneshot_rank(rank, world):
    out = []
    for fields in ONESHOT:
        model = _shard_model(_mlp())
        torch.manual_seed(12345 + rank)
        res = _oneshot(model, _shard(_global_batches(3, 12), rank, world), fields)
        out.append({"masks": _local_masks(res.masks), "sparsity": res.masks.sparsity(),
                    "report": res.report.to_dict()})
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_one_shot_prune_global_matches_single_process(tmp_path, world):
    results = run_ranks(tmp_path, _oneshot_rank, world=world)
    for i, fields in enumerate(ONESHOT):
        res = _oneshot(_mlp(), _global_batches(3, 12), fields)
        per_rank = [r[i] for r in results]
        _assert_equal_masks(_stack(per_rank, "masks"), _local_masks(res.masks))
        assert all(r["sparsity"] == res.masks.sparsity() for r in per_rank), fields
        assert all(r["report"] == res.report.to_dict() for r in per_rank), fields


# ---------------------------------------------------------------------------------------------
# sparse training: every preset with updates (RigL, SET, SNFS: momentum growth and redistribution)

SPARSE = {"rigl": lambda: gp.SparseConfig.rigl(density=0.3, total_steps=8, update_interval=2),
          "snfs": lambda: gp.SparseConfig.snfs(density=0.3, total_steps=8, update_interval=2),
          "set": lambda: gp.SparseConfig.set(density=0.3, total_steps=8, update_interval=2),
          "global_magnitude": lambda: gp.SparseConfig.rigl(density=0.3, total_steps=8, update_interval=2,
                                                           prune="global_magnitude", init="uniform"),
          "pruning": lambda: gp.SparseConfig.pruning(density=0.3, total_steps=8, update_interval=2)}


def _sparse_loop(model, batches, preset):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = gp.SparseTrainer(model, opt, SPARSE[preset]())
    for batch in batches:
        opt.zero_grad()
        _ce(model, batch).backward()
        trainer.step()
    return trainer, opt


def _sparse_rank(rank, world, presets):
    from gradprune._distributed import local

    out = {}
    for preset in presets:
        model = _shard_model(_mlp())
        torch.manual_seed(12345 + rank)
        trainer, opt = _sparse_loop(model, _shard(_global_batches(8, 12), rank, world), preset)
        zero = all(bool((local(p.detach())[~trainer.masks[n]] == 0).all()) for n, p in trainer.masks.params().items())
        if not trainer.config.dense_gradients:  # SNFS keeps a dense momentum by design
            zero = zero and all(bool((local(opt.state[p]["momentum_buffer"])[~trainer.masks[n]] == 0).all())
                                for n, p in trainer.masks.params().items())
        out[preset] = {"masks": _local_masks(trainer.masks), "params": _local_params(model),
                       "updates": trainer.updates, "history": trainer.history, "zero": zero}
    return out


def _check_sparse(results, presets):
    for preset in presets:
        trainer, _ = _sparse_loop(single := _mlp(), _global_batches(8, 12), preset)
        per_rank = [r[preset] for r in results]
        _assert_equal_masks(_stack(per_rank, "masks"), _local_masks(trainer.masks))
        _assert_close(_stack(per_rank, "params"), _local_params(single))
        assert all(r["updates"] == trainer.updates > 0 for r in per_rank), preset
        assert all(r["history"] == trainer.history for r in per_rank), preset
        assert all(r["zero"] for r in per_rank), preset


def test_sparse_trainer_presets_match_single_process_2_ranks(tmp_path):
    results = run_ranks(tmp_path, _sparse_rank, list(SPARSE), world=2)
    _check_sparse(results, list(SPARSE))


@pytest.mark.slow
def test_sparse_trainer_rigl_snfs_match_single_process_3_ranks(tmp_path):
    results = run_ranks(tmp_path, _sparse_rank, ["rigl", "snfs"], world=3)
    _check_sparse(results, ["rigl", "snfs"])


# ---------------------------------------------------------------------------------------------
# checkpoints through torch.distributed.checkpoint (DCP): model + optimizer + trainer/pruner state

def _dcp_state(model, opt, obj) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from gradprune.integrations.distributed import Checkpointable

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
            "gradprune": Checkpointable(obj)}


def _dcp_load(path, model, opt, obj) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _dcp_state(model, opt, obj)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def _rigl():
    return gp.SparseConfig.rigl(density=0.3, total_steps=12, update_interval=2)


def _train(model, opt, trainer, batches):
    for batch in batches:
        opt.zero_grad()
        _ce(model, batch).backward()
        trainer.step()


def _dcp_rank(rank, world, path, phase):
    """``phase="resume"``: 4 steps, save, 4 more steps (reference); a fresh model, optimizer and
    trainer load the checkpoint and run the same 4 steps. ``phase="reshard"``: load what another
    world size saved, then train on."""
    import torch.distributed.checkpoint as dcp

    batches = _shard(_global_batches(8, 12), rank, world)

    def build():
        model = _shard_model(_mlp())
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        return model, opt, gp.SparseTrainer(model, opt, _rigl())

    if phase == "resume":
        model, opt, trainer = build()
        _train(model, opt, trainer, batches[:4])
        dcp.save(_dcp_state(model, opt, trainer), checkpoint_id=str(path))
        saved = _local_masks(trainer.masks)
        _train(model, opt, trainer, batches[4:])
        ref = {"masks": _local_masks(trainer.masks), "params": _local_params(model), "saved": saved}
    model, opt, trainer = build()
    torch.manual_seed(777 + rank)
    _dcp_load(path, model, opt, trainer)
    loaded = _local_masks(trainer.masks)
    _train(model, opt, trainer, batches[4:])
    out = {"loaded": loaded, "masks": _local_masks(trainer.masks), "params": _local_params(model),
           "updates": trainer.updates, "step": trainer.step_count}
    return {**out, "ref": ref} if phase == "resume" else out


@pytest.mark.slow
def test_dcp_resume_is_bitwise_and_reshards_to_another_world_size(tmp_path):
    ckpt = tmp_path / "ckpt"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    results = run_ranks(tmp_path / "a", _dcp_rank, ckpt, "resume", world=2)
    for r in results:
        _assert_equal_masks(r["loaded"], r["ref"]["saved"])
        _assert_equal_masks(r["masks"], r["ref"]["masks"])
        for n in r["params"]:
            assert torch.equal(r["params"][n], r["ref"]["params"][n]), f"{n} not bitwise identical"
    saved = _stack([r["ref"] for r in results], "saved")
    resharded = run_ranks(tmp_path / "b", _dcp_rank, ckpt, "reshard", world=3)
    _assert_equal_masks(_stack(resharded, "loaded"), saved)
    assert all(r["step"] == 8 and r["updates"] == results[0]["updates"] for r in resharded)
    kept = {n: int(m.sum()) for n, m in _stack(resharded, "masks").items()}
    assert kept == {n: int(m.sum()) for n, m in _stack(results, "masks").items()}  # exact counts kept


# ---------------------------------------------------------------------------------------------
# memory: no rank materialises a whole parameter, gradient or score tensor

def _forbid_gathers():
    """Make every DTensor redistribution that yields a whole tensor (``full_tensor``,
    ``redistribute`` to ``Replicate``, an op's implicit gather) of more than 16 entries raise:
    FSDP2's own all-gathers of forward and backward do not go through it."""
    import math
    from unittest import mock

    import torch.distributed.tensor._api as api
    import torch.distributed.tensor._dispatch as dispatch
    import torch.distributed.tensor._redistribute as redist

    real = redist.redistribute_local_tensor

    def guarded(local_tensor, current_spec, target_spec, *args, **kwargs):
        out = real(local_tensor, current_spec, target_spec, *args, **kwargs)
        whole = math.prod(target_spec.shape)
        if whole > 16 and out.numel() == whole:
            raise AssertionError(f"a whole tensor of shape {tuple(target_spec.shape)} was gathered")
        return out

    return [mock.patch.object(m, "redistribute_local_tensor", guarded) for m in (dispatch, api, redist)
            if hasattr(m, "redistribute_local_tensor")]


def _no_gather_rank(rank, world):
    import contextlib

    batches = _shard(_global_batches(6, 12), rank, world)
    done = []
    with contextlib.ExitStack() as stack:
        for p in _forbid_gathers():
            stack.enter_context(p)
        from torch.distributed.tensor import DTensor

        probe = _shard_model(_mlp())[0].weight
        try:  # the guard works: a whole weight cannot be gathered
            DTensor.full_tensor(probe)
        except AssertionError:
            done.append("guard")
        _pruner_loop(_shard_model(_mlp()), batches)
        done.append("pruner")
        for preset in ("rigl", "snfs"):
            _sparse_loop(_shard_model(_mlp()), batches, preset)
            done.append(preset)
        for fields in ONESHOT:
            _oneshot(_shard_model(_mlp()), batches[:2], fields)
        done.append("prune")
    return done


def test_no_rank_gathers_a_whole_tensor(tmp_path):
    results = run_ranks(tmp_path, _no_gather_rank, world=2)
    assert results == [["guard", "pruner", "rigl", "snfs", "prune"]] * 2


# ---------------------------------------------------------------------------------------------
# pre_prune; patterns whose units would straddle the shards

def _preprune_rank(rank, world):
    from test_distributed import _preprune

    model = _shard_model(_mlp())
    torch.manual_seed(99 + rank)
    out = {"mean": {"masks": _preprune(model, "mean")[0]}}
    try:  # per-sample statistics need whole per-sample gradients: refused, before any work
        _preprune(model, "mean_sq")
    except ValueError as e:
        out["per_sample"] = str(e)
    torch.manual_seed(0)
    model = _shard_model(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4)))
    try:  # 16 rows over 3 ranks: 6, 6, 4; blocks of 4 rows would straddle ranks 0 and 1
        gp.prune(model, criterion="magnitude", sparsity=0.5, pattern="4x1")
    except ValueError as e:
        out["straddle"] = str(e)
    out["row_local"] = gp.prune(model, criterion="magnitude", sparsity=0.5, pattern="2:4").masks.sparsity()
    return out


@pytest.mark.parametrize("world", [3])
def test_pre_prune_matches_single_process_and_straddling_blocks_are_refused(tmp_path, world):
    from test_distributed import _preprune

    results = run_ranks(tmp_path, _preprune_rank, world=world)
    expect, _, _ = _preprune(_mlp(), "mean")
    _assert_equal_masks(_stack([r["mean"] for r in results], "masks"), expect)
    assert all("statistic='mean_sq'" in r["per_sample"] for r in results)
    for r in results:  # every rank refuses (none is left waiting in a collective), naming the layer
        assert "layer '0.weight'" in r["straddle"] and "'4x1'" in r["straddle"]
        assert r["row_local"] == 0.5  # N:M along the input dimension stays within a row


# ---------------------------------------------------------------------------------------------
# the docs' example, and FSDP1's deprecation

def test_docs_fsdp2_example_runs_in_two_processes(tmp_path):
    from test_distributed import _example_worker

    results = run_ranks(tmp_path, _example_worker, "distributed_fsdp2")
    assert results[0] == results[1]
    res = results[0]
    assert res["gradual"] == 0.5 and res["oneshot"] == 0.75 and res["updates"] == 2 and res["resumed"]
    assert res["density"] == pytest.approx(0.3, abs=0.01)


def test_docs_show_the_fsdp2_example_verbatim_first():
    from test_distributed import ROOT

    doc = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    source = (ROOT / "examples" / "distributed_fsdp2.py").read_text(encoding="utf-8")
    assert source.startswith("# torchrun --standalone --nproc_per_node 2\n")
    assert source in doc and doc.index(source) < doc.index("## FSDP1")
    assert "torchrun --standalone --nproc_per_node 2 examples/distributed_fsdp2.py" in doc


def _fsdp1_rank(rank, world):
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from gradprune.integrations.distributed import FSDPPruner

    model = FSDP(_mlp(), use_orig_params=True, device_id=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FSDPPruner(model, gp.PruneConfig(target_sparsity=0.5, end_step=2, frequency=1))
    return [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def test_fsdp1_wrappers_are_deprecated(tmp_path):
    results = run_ranks(tmp_path, _fsdp1_rank, world=2)
    assert all(any("FSDPPruner drives FSDP1" in m and "fully_shard" in m for m in r) for r in results)


@pytest.mark.slow
def test_lightning_callbacks_run_unchanged_under_model_parallel_strategy(tmp_path):
    from test_distributed import ROOT, torchrun_script

    pytest.importorskip("lightning")
    out = torchrun_script(ROOT / "examples" / "lightning_fsdp2.py", tmp_path)
    assert "Lightning FSDP2 gradual: sparsity 0.50; SNFS: 2 updates, density 0.30" in out


def _replace_rank(rank, world):
    from torch.distributed.tensor import Replicate, Shard

    from gradprune._distributed import local

    model = _shard_model(_mlp())
    res = gp.prune(model, criterion="magnitude", sparsity=0.5)
    masks, layer = res.masks, model[2]
    sharded = masks["2.weight"].clone()
    with torch.no_grad():  # re-placed: the weight is now replicated (and dense again)
        layer.weight = nn.Parameter(layer.weight.redistribute(layer.weight.device_mesh, [Replicate()]).add_(1.0))
    replicated = masks["2.weight"].clone()  # re-derived for the new placement, applied at once
    zero_after_replace = bool((local(layer.weight.detach())[~replicated] == 0).all())
    with torch.no_grad():  # and back to dim-0 shards
        layer.weight = nn.Parameter(layer.weight.redistribute(layer.weight.device_mesh, [Shard(0)]))
    back = masks["2.weight"].clone()
    return {"sharded": sharded, "replicated": replicated, "back": back, "zero": zero_after_replace,
            "sparsity": masks.sparsity()}


def test_masks_follow_a_change_of_placement(tmp_path):
    results = run_ranks(tmp_path, _replace_rank, world=2)
    whole = torch.cat([r["sharded"] for r in results])
    for r in results:
        assert torch.equal(r["replicated"], whole)  # never a stale shard
        assert torch.equal(r["back"], r["sharded"]) and r["zero"]
        assert r["sparsity"] == 0.5


# ---------------------------------------------------------------------------------------------
# structured search: the structure is analysed on a meta copy, the gates score the shards

SEARCHES = [("gradnas", False), ("gradnas", True), ("taylor", False), ("michel", False), ("magnitude", False)]


def _structured(model, data):
    from gradprune.structured import search
    from test_distributed import _SEARCH_RULES

    out = {}
    for method, per_sample in SEARCHES:
        res = search(model, {"params": "60%"}, data, _ce, method, example_input=torch.randn(2, 1, 6, 6),
                     rules=_SEARCH_RULES, per_sample=per_sample)
        out[f"{method}{'_ps' if per_sample else ''}"] = {
            "widths": res.widths, "keep": {gi: k.tolist() for gi, k in res.keep.items()},
            "scores": {gi: v.clone() for gi, v in res.scores.items()}, "params": res.params,
            "flops": res.flops, "batches": res.batches}
    return out, res


def _search_batches():
    gen = torch.Generator().manual_seed(7)  # 12 samples a batch: equal shards on 2 and 3 ranks
    return [(torch.randn(12, 1, 6, 6, generator=gen), torch.randint(0, 4, (12,), generator=gen)) for _ in range(3)]


def _search_rank(rank, world):
    import contextlib

    from test_distributed import _search_cnn

    model = _shard_model(_search_cnn(0))
    torch.manual_seed(50 + rank)
    with contextlib.ExitStack() as stack:  # scoring never gathers a whole weight outside FSDP2's own
        for p in _forbid_gathers():
            stack.enter_context(p)
        out, res = _structured(model, _shard(_search_batches(), rank, world))
    out["report"] = res.report.to_dict()
    try:
        res.export()
    except ValueError as e:
        out["export_error"] = str(e)
    out["local"] = _local_params(model)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_structured_search_scoring_matches_single_process(tmp_path, world):
    from test_distributed import _search_cnn

    results = run_ranks(tmp_path, _search_rank, world=world)
    expect, single = _structured(_search_cnn(0), _search_batches())
    for rank, got in enumerate(results):
        for key, ref in expect.items():
            res = got[key]
            assert res["keep"] == ref["keep"] and res["widths"] == ref["widths"], f"rank {rank}: {key}"
            assert (res["params"], res["flops"], res["batches"]) == (ref["params"], ref["flops"], ref["batches"])
            for gi in ref["scores"]:
                a, b = res["scores"][gi], ref["scores"][gi]
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-12), (rank, key, gi, (a - b).abs().max(), a, b)
        assert got["report"] == single.report.to_dict()
        assert "export needs whole weights" in got["export_error"] and "export(model=" in got["export_error"]
    # the user gathers the weights into an unsharded copy and exports from it: the single run's export
    whole = {n: torch.cat([r["local"][n] for r in results]) for n in results[0]["local"]}
    copy = _search_cnn(1)
    copy.load_state_dict(whole)
    exported = single.export(model=copy)
    reference = single.export()
    for (n, a), (_, b) in zip(exported.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), n


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _bert_batches():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 40, (4, 6), generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(3)]


def _bert_search(model, data):
    from gradprune.structured import search

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]).logits, batch[1])

    out = {}
    for uniform in (False, True):
        res = search(model, {"params": "90%"}, data, loss_fn, "gradnas", data[0][0],
                     rules={"nn.Linear": {"feature_divisor": 1}}, uniform=uniform)
        out[uniform] = {"groups": [(g.name, g.unit) for g in res.groups], "widths": res.widths,
                        "keep": {gi: k.tolist() for gi, k in res.keep.items()}, "params": res.params,
                        "scores": res.scores}
    return out


def _bert_rank(rank, world):
    import contextlib

    from torch.distributed.fsdp import fully_shard

    model = _tiny_bert()
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    with contextlib.ExitStack() as stack:
        for p in _forbid_gathers():
            stack.enter_context(p)
        return _bert_search(model, _shard(_bert_batches(), rank, world))


@pytest.mark.slow
def test_structured_search_on_a_sharded_hugging_face_model_matches_single_process(tmp_path):
    pytest.importorskip("transformers")
    results = run_ranks(tmp_path, _bert_rank, world=2)
    expect = _bert_search(_tiny_bert(), _bert_batches())
    assert any(unit == "heads" for _, unit in expect[False]["groups"])  # heads and FFN neurons
    for got in results:
        for uniform, ref in expect.items():
            res = got[uniform]
            assert {k: res[k] for k in ("groups", "widths", "keep", "params")} == \
                {k: ref[k] for k in ("groups", "widths", "keep", "params")}
            for gi, s in ref["scores"].items():
                assert torch.allclose(res["scores"][gi], s, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Hugging Face Trainer callbacks: sharded masks are saved and resumed through DCP

def _hf_callbacks_rank(rank, world, folder):
    from types import SimpleNamespace

    from gradprune.integrations.hf import STATE_DIR, STATE_FILE, PruningCallback, SparseTrainingCallback

    pytest.importorskip("transformers")
    batches = _shard(_global_batches(8, 12), rank, world)
    args = SimpleNamespace(output_dir=str(folder))

    def run(cb, model, opt, steps, start=0):
        for i, batch in enumerate(steps, start=start + 1):  # the Trainer's hook order
            cb.on_step_begin(args, None, None)
            opt.zero_grad()
            _ce(model, batch).backward()
            cb.on_pre_optimizer_step(args, None, None)
            opt.step()
            cb.on_optimizer_step(args, None, None)
            if i == 4:
                cb.on_save(args, SimpleNamespace(global_step=i), None)

    out = {}
    for kind in ("pruning", "sparse"):
        def make(resume_from=None):
            model = _shard_model(_mlp())
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            cb = (PruningCallback(gp.PruneConfig(**PRUNE_CFG), resume_from=resume_from) if kind == "pruning" else
                  SparseTrainingCallback(SPARSE["rigl"](), resume_from=resume_from))
            cb.on_train_begin(args, None, None, model=model, optimizer=opt)
            return cb, model, opt

        args.output_dir = str(folder / kind)
        cb, model, opt = make()
        run(cb, model, opt, batches)
        ckpt = folder / kind / "checkpoint-4"
        written = sorted(p.name for p in ckpt.iterdir())
        # the state at step 4 is what a fresh run restores; it then trains on like the first run
        fresh, model2, opt2 = make(resume_from=str(ckpt))
        resumed = fresh.pruner if kind == "pruning" else fresh.sparse
        out[kind] = {"written": written, "step": (resumed.step if kind == "pruning" else resumed.step_count),
                     "loaded": _local_masks(resumed.masks)}
    try:  # a sharded run refuses the whole-mask file of an unsharded run
        (folder / "unsharded").mkdir(exist_ok=True)
        if rank == 0:
            torch.save({}, folder / "unsharded" / STATE_FILE)
        torch.distributed.barrier()
        cb = PruningCallback(gp.PruneConfig(**PRUNE_CFG), resume_from=str(folder / "unsharded"))
        model = _shard_model(_mlp())
        cb.on_train_begin(args, None, None, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    except ValueError as e:
        out["refused"] = str(e)
    out["dir"] = STATE_DIR
    return out


def _hf_single_at_step_4(kind):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = (gp.Pruner(model, gp.PruneConfig(**PRUNE_CFG), optimizer=opt) if kind == "pruning"
              else gp.SparseTrainer(model, opt, SPARSE["rigl"]()))
    for batch in _global_batches(8, 12)[:4]:
        if kind == "pruning":
            engine.on_step_begin()
        opt.zero_grad()
        _ce(model, batch).backward()
        if kind == "pruning":
            engine.on_before_optimizer_step()
            opt.step()
            engine.on_after_optimizer_step()
        else:
            engine.before_optimizer_step()
            opt.step()
            engine.after_optimizer_step()
    return _local_masks(engine.masks)


@pytest.mark.slow
def test_hf_callbacks_save_sharded_masks_with_dcp_and_resume(tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "out"
    folder.mkdir()
    (tmp_path / "run").mkdir()
    results = run_ranks(tmp_path / "run", _hf_callbacks_rank, folder, world=2)
    for kind in ("pruning", "sparse"):
        per_rank = [r[kind] for r in results]
        assert all(r["written"] == [results[0]["dir"]] for r in per_rank)  # a DCP folder, no .pt file
        assert all(r["step"] == 4 for r in per_rank)
        _assert_equal_masks(_stack(per_rank, "loaded"), _hf_single_at_step_4(kind))
    assert all("gradprune_state/" in r["refused"] for r in results)


@pytest.mark.slow
def test_hf_trainer_callbacks_run_unchanged_under_accelerate_fsdp2(tmp_path):
    from test_distributed import ROOT, torchrun_script

    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = torchrun_script(ROOT / "examples" / "hf_trainer_fsdp2.py", tmp_path)
    assert ("HF Trainer FSDP2: sharded True; gradual: sparsity 0.50, state saved True, resumed True at step 8; "
            "SNFS: 2 updates, density 0.30") in out


# ---------------------------------------------------------------------------------------------
# check_masks_in_sync on sharded masks: per-shard checksums, no rows cross ranks

def _in_sync_rank(rank, world):
    import contextlib

    from gradprune.integrations.distributed import MasksOutOfSyncError, check_masks_in_sync

    pruner, _ = _pruner_loop(_shard_model(_mlp()), _shard(_global_batches(STEPS, 12), rank, world))
    out = {}
    with contextlib.ExitStack() as stack:  # shard by shard: nothing whole is gathered
        for p in _forbid_gathers():
            stack.enter_context(p)
        out["digest"] = check_masks_in_sync(pruner)
    mask = pruner.masks["2.weight"]
    if rank == world - 1:  # this rank's shard goes astray: a kept weight is dropped from its mask only
        kept = torch.nonzero(mask.flatten()).flatten()[0]
        mask.view(-1)[kept] = False
    try:
        check_masks_in_sync(pruner.masks)
    except MasksOutOfSyncError as e:
        out["error"] = str(e)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_check_masks_in_sync_on_sharded_masks_detects_a_desynced_shard(tmp_path, world):
    results = run_ranks(tmp_path, _in_sync_rank, world=world)
    assert len({r["digest"] for r in results}) == 1  # in sync: the same digest on every rank
    for r in results:  # every rank raises, naming the rank and the layer
        assert f"rank {world - 1}: '2.weight': 1 pruned entries are nonzero" in r["error"], r["error"]
        assert "rank 0" not in r["error"]


class _Encoder(nn.Module):
    """A tiny transformer: torch's own multi-head attention (heads) and feed-forward (neurons)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def _encoder_batches():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 5, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)) for _ in range(3)]


def _encoder_search(model, data):
    from gradprune.structured import search

    out = {}
    for method in ("gradnas", "magnitude"):
        res = search(model, {"params": "80%"}, data, _ce, method, example_input=torch.randn(2, 5, 8),
                     rules={"nn.Linear": {"feature_divisor": 1}})
        out[method] = {"groups": [(g.name, g.unit) for g in res.groups], "keep": {gi: k.tolist() for gi, k in res.keep.items()},
                       "widths": res.widths, "params": res.params, "scores": res.scores}
    return out


def _encoder_rank(rank, world):
    import contextlib

    from torch.distributed.fsdp import fully_shard

    model = _Encoder()
    fully_shard(model.layer)
    fully_shard(model)
    with contextlib.ExitStack() as stack:
        for p in _forbid_gathers():
            stack.enter_context(p)
        return _encoder_search(model, _shard(_encoder_batches(), rank, world))


def test_structured_search_on_sharded_multihead_attention_matches_single_process(tmp_path):
    results = run_ranks(tmp_path, _encoder_rank, world=2)
    expect = _encoder_search(_Encoder(), _encoder_batches())
    assert any(unit == "heads" for _, unit in expect["gradnas"]["groups"])
    for got in results:
        for method, ref in expect.items():
            res = got[method]
            assert {k: res[k] for k in ("groups", "keep", "widths", "params")} == \
                {k: ref[k] for k in ("groups", "keep", "widths", "params")}, method
            for gi, s in ref["scores"].items():
                assert torch.allclose(res["scores"][gi], s, rtol=1e-5, atol=1e-12), (method, gi)


_HSDP_SCRIPT = '''
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
import gradprune as gp
from gradprune.integrations.distributed import MasksOutOfSyncError, check_masks_in_sync

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))  # HSDP: 2 replicas of 1 shard
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
masks = gp.prune(model, criterion="magnitude", sparsity=0.5).masks
digest = check_masks_in_sync(masks)
if dist.get_rank() == 1:  # this replica keeps one more weight than the other: its weights are still 0
    m = masks["0.weight"].view(-1)
    m[torch.nonzero(~m)[0]] = True
try:
    check_masks_in_sync(masks)
    print("not detected")
except MasksOutOfSyncError as e:
    line = f"rank {dist.get_rank()} {tuple(model[0].weight.placements)} in sync {digest[:8]}; then: {e}"
    with open(f"rank{dist.get_rank()}.txt", "w", encoding="utf-8") as f:  # ranks' stdout may interleave
        f.write(line)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_check_masks_in_sync_compares_replicas_of_a_shard_under_hsdp(tmp_path):
    from test_distributed import torchrun_script

    script = tmp_path / "hsdp.py"
    script.write_text(_HSDP_SCRIPT, encoding="utf-8")
    assert "not detected" not in torchrun_script(script, tmp_path, timeout=300)
    lines = [(tmp_path / f"rank{r}.txt").read_text(encoding="utf-8") for r in range(2)]
    digests = {line.split(" in sync ")[1][:8] for line in lines}
    assert len(digests) == 1  # in sync at first: the same digest on both ranks
    for line in lines:
        assert "(Replicate(), Shard(dim=0))" in line
        assert "rank 1: '0.weight': rows 0:16 differ from those of rank 0" in line
