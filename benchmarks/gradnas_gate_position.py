"""gradnas gate position of FFN neurons on real all-MiniLM-L6-v2 (issue 14.3).

ModelOpt's gradnas gates BERT's ``intermediate.dense`` output *before* the activation; gradprune
offers both positions (``search(..., mlp_gate="pre_activation" | "post_activation")``). For each
seed (which calibration pairs are drawn) and each encoder-params budget, both positions search the
same model on the same batches (MultipleNegativesRankingLoss on consecutive pydoc sentence pairs,
as all-MiniLM was trained); the exported model is measured on held-out sentences against the dense
model: the cosine similarity of the mean-pooled embeddings (fidelity), one-shot and after a short
distillation to the dense embeddings, and the held-out contrastive loss.

    PYTHONPATH=src python benchmarks/gradnas_gate_position.py            # 3 seeds, 50% budget
    PYTHONPATH=src python benchmarks/gradnas_gate_position.py --seeds 5  # 5 seeds, 50% and 25%
    PYTHONPATH=src python benchmarks/gradnas_gate_position.py --quick    # 1 seed

Writes benchmarks/results/gradnas_gate_position.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from structured_vs_peers import (bert_data, distill, embed, fidelity, load_bert, mnrl,  # noqa: E402
                                 tokenize)

import gradprune.structured as st  # noqa: E402

POSITIONS = ("pre_activation", "post_activation")
CFG = dict(bert_eval=256, bert_len=32, bert_batch=16, bert_calib=8, distill_steps=0,
           distill_batch=32, lr=5e-5)


@torch.no_grad()
def heldout_loss(model, ids, mask):
    return statistics.fmean(mnrl(embed(model, ids[i:i + 32], mask[i:i + 32])).item()
                            for i in range(0, len(ids) - 31, 32))


def run(seeds, budgets, log):
    path, tok, dense = load_bert()
    recs = []
    for seed in seeds:
        eval_s, pairs, train_s = bert_data(CFG, seed)
        ev_ids, ev_mask = tokenize(tok, eval_s, CFG["bert_len"])
        B = CFG["bert_batch"]
        calib = []
        for k in range(CFG["bert_calib"]):
            chunk = pairs[k * B:(k + 1) * B]
            calib.append(tokenize(tok, [a for a, _ in chunk] + [b for _, b in chunk], CFG["bert_len"]))
        # held-out pairs: consecutive sentences of the held-out topics' text order
        ho = eval_s[: len(eval_s) // 2 * 2]
        ho_ids, ho_mask = tokenize(tok, ho[0::2][:96] + ho[1::2][:96], CFG["bert_len"])
        with torch.no_grad():
            dense_emb = torch.cat([embed(dense, ev_ids[i:i + 64], ev_mask[i:i + 64]) for i in range(0, len(ev_ids), 64)])
        if CFG["distill_steps"]:
            ds_ids, ds_mask = tokenize(tok, train_s[:512], CFG["bert_len"])
            with torch.no_grad():
                ds_target = torch.cat([embed(dense, ds_ids[i:i + 64], ds_mask[i:i + 64]) for i in range(0, len(ds_ids), 64)])
        ex = (ev_ids[:1], ev_mask[:1])
        d_params, enc = st.count_params(dense), st.count_params(dense.encoder)
        dense_loss = heldout_loss(dense, ho_ids, ho_mask)
        recs.append({"seed": seed, "position": "dense", "budget": None, "params": d_params,
                     "fid_oneshot": 1.0, "fid_distill": 1.0, "heldout_loss": dense_loss})
        loss_fn = lambda m, b: mnrl(embed(m, b[0], b[1]))  # noqa: E731
        for frac in budgets:
            bound = int(d_params - (1 - frac) * enc)
            for pos in POSITIONS:
                t0 = time.perf_counter()
                res = st.search(copy.deepcopy(dense), {"params": bound}, calib, loss_fn, "gradnas",
                                example_input=ex, show_progress=False, mlp_gate=pos,
                                rules={"nn.Linear": {"feature_divisor": 32},
                                       "hf.BertSelfAttention": {"n_heads_divisor": 1}})
                small = res.export()
                secs = time.perf_counter() - t0
                heads = [len(res.keep.get(gi, range(g.size))) for gi, g in enumerate(res.groups) if g.handler]
                ffn = [len(res.keep.get(gi, range(g.size))) for gi, g in enumerate(res.groups) if not g.handler]
                rec = {"seed": seed, "position": pos, "budget": frac, "params": st.count_params(small),
                       "params_bound": bound, "heads": heads, "ffn": ffn, "search_s": round(secs, 2),
                       "fid_oneshot": fidelity(small, dense_emb, ev_ids, ev_mask),
                       "heldout_loss": heldout_loss(small, ho_ids, ho_mask)}
                if CFG["distill_steps"]:  # a short distillation to the dense embeddings
                    distill(small, ds_ids, ds_mask, ds_target, CFG["distill_steps"], CFG["distill_batch"],
                            CFG["lr"], seed)
                rec["fid_distill"] = fidelity(small, dense_emb, ev_ids, ev_mask) if CFG["distill_steps"] else None
                recs.append(rec)
                log(json.dumps(rec))
    return recs


def summary(recs, budgets, command):
    lines = ["# gradnas gate position of FFN neurons (all-MiniLM-L6-v2)", "",
             f"Command: `{command}`", "",
             f"Settings: {json.dumps(CFG)}; torch {torch.__version__}, 1 thread. Budget = fraction "
             "of the encoder's parameters kept (embeddings are never pruned). Fidelity = mean cosine "
             "similarity of the pruned model's mean-pooled embeddings to the dense model's on "
             f"{CFG['bert_eval']} held-out pydoc sentences (the JSON also holds an in-batch "
             "contrastive loss on held-out sentences, whose halves are not true pairs: not a "
             "quality measure).", "",
             "| budget | position | fidelity one-shot | fidelity after distillation | seeds |",
             "|---|---|---|---|---|"]
    out = {}
    for frac in budgets:
        for pos in POSITIONS:
            rs = [r for r in recs if r["budget"] == frac and r["position"] == pos]
            keys = ("fid_oneshot", "heldout_loss") + (("fid_distill",) if CFG["distill_steps"] else ())
            m = {k: statistics.fmean(r[k] for r in rs) for k in keys}
            sd = {k: statistics.pstdev(r[k] for r in rs) for k in m}
            out[(frac, pos)] = rs
            fd = f"{m['fid_distill']:.4f} ± {sd['fid_distill']:.4f}" if "fid_distill" in m else "—"
            lines.append(f"| {frac:.0%} | {pos} | {m['fid_oneshot']:.4f} ± {sd['fid_oneshot']:.4f} | "
                         f"{fd} | {len(rs)} |")
    lines += [""]
    for frac in budgets:
        pre, post = out[(frac, "pre_activation")], out[(frac, "post_activation")]
        diffs = [a["fid_oneshot"] - b["fid_oneshot"] for a, b in zip(pre, post)]
        wins = sum(d > 0 for d in diffs)
        lines.append(f"- {frac:.0%}: pre − post one-shot fidelity per seed {', '.join(f'{d:+.4f}' for d in diffs)} "
                     f"(pre better in {wins}/{len(diffs)} seeds).")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.seeds))
    budgets = [0.5] if args.quick else [0.5] + ([0.25] if args.seeds > 3 else [])
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recs = run(seeds, budgets, logging.getLogger("gate_position").info)
    out = HERE / "results" / ("gradnas_gate_position_quick" if args.quick else "gradnas_gate_position")
    command = "PYTHONPATH=src python benchmarks/gradnas_gate_position.py" + (" --quick" if args.quick else "")
    out.with_suffix(".json").write_text(json.dumps({"config": CFG, "records": recs}, indent=1))
    out.with_suffix(".md").write_text(summary(recs, budgets, command))


if __name__ == "__main__":
    main()
