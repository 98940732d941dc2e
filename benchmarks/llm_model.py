"""Shared small LLaMA-architecture language model for the LLM benchmarks (not a test).

Used by ``benchmarks/llm_oneshot.py`` (one-shot sparsity) and meant for the structured-LLM
benchmark too, so both measure on the same model and the same data.

* **Text.** CPython's ``pydoc_data.topics`` (always present) plus, when installed, the Debian
  ``python3-doc`` HTML manual (``apt-get install python3-doc``) converted to plain text with the
  standard library's ``html.parser``. Documents are split deterministically (by a hash of their
  name) into train / validation / test.
* **Tokenizer.** A byte-level BPE with ``VOCAB`` tokens trained with ``tokenizers`` on the train
  split (a 30k WordPiece vocabulary would spend most of a 5M-parameter budget on embeddings).
* **Model.** ``transformers.LlamaConfig``: 6 layers, hidden 256, 8 query heads / 2 KV heads (GQA),
  SwiGLU MLP 688, tied embeddings: about 6.3M parameters.
* **Training.** AdamW, cosine schedule, 1 CPU thread, until held-out perplexity flattens (less
  than 1% better over two evaluations) or ``--minutes`` run out.

Everything is cached under ``~/.cache/gradprune-bench`` (outside git); ``load()`` returns the
cached model or trains it. Run ``nice -n 10 python benchmarks/llm_model.py`` to train ahead.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import html.parser
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("GRADPRUNE_BENCH_CACHE", Path.home() / ".cache" / "gradprune-bench"))
MODEL_DIR = CACHE / "llama-gqa-6m"
VOCAB = 8192
SEQ_LEN = 128
DOC_GLOB = "/usr/share/doc/python3*/html/**/*.html"

log = logging.getLogger("llm_model")


class _Text(html.parser.HTMLParser):
    """Visible text of a Sphinx page's body (skips scripts, styles, nav and sidebars)."""

    SKIP = {"script", "style", "nav", "head"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        cls = dict(attrs).get("class") or ""
        if tag in self.SKIP or "sphinxsidebar" in cls or "related" in cls or "footer" in cls:
            self._skip += 1
        elif self._skip:
            self._skip += tag not in {"br", "img", "hr", "meta", "link", "input"}
        if tag in {"p", "div", "li", "pre", "h1", "h2", "h3", "h4", "dt", "dd", "tr"} and not self._skip:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self._skip and tag not in {"br", "img", "hr", "meta", "link", "input"}:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def html_to_text(page: str) -> str:
    p = _Text()
    p.feed(page)
    lines = [" ".join(line.split()) for line in "".join(p.parts).splitlines()]
    return "\n".join(line for line in lines if line)


def documents() -> dict[str, str]:
    """Name -> text of every document of the corpus, in a fixed order."""
    import pydoc_data.topics

    docs = {f"pydoc:{k}": v for k, v in sorted(pydoc_data.topics.topics.items())}
    for path in sorted(glob.glob(DOC_GLOB, recursive=True)):
        name = os.path.basename(path)
        if name.startswith(("genindex", "py-modindex", "search")) or "/_" in path:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = html_to_text(f.read())
        if len(text) > 200:
            docs[f"html:{path}"] = text
    return docs


def split_of(name: str) -> str:
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100
    return "test" if h < 5 else "val" if h < 10 else "train"


def corpus() -> dict[str, str]:
    """``{"train"|"val"|"test": text}``, deterministic."""
    out = {"train": [], "val": [], "test": []}
    for name, text in documents().items():
        out[split_of(name)].append(text)
    return {k: "\n\n".join(v) for k, v in out.items()}


def tokenizer(texts: dict[str, str] | None = None):
    """The cached byte-level BPE tokenizer (trained on the train split on first use)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = CACHE / "bpe-8k.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    texts = texts or corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chunks = texts["train"].split("\n\n")
    tok.train_from_iterator(chunks, trainer=trainer)
    CACHE.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def token_ids() -> dict[str, torch.Tensor]:
    """Cached 1-D int64 token streams per split."""
    path = CACHE / "tokens.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    texts = corpus()
    tok = tokenizer(texts)
    eos = tok.token_to_id("<eos>")
    ids = {}
    for split, text in texts.items():
        stream: list[int] = []
        for enc in tok.encode_batch(text.split("\n\n")):
            stream.extend(enc.ids)
            stream.append(eos)
        ids[split] = torch.tensor(stream, dtype=torch.long)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(ids, path)
    return ids


def sequences(stream: torch.Tensor, n: int | None = None, seed: int | None = None,
              seq_len: int = SEQ_LEN) -> torch.Tensor:
    """``[n, seq_len]`` windows: non-overlapping in order (seed None) or random starts (seeded)."""
    if seed is None:
        full = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)
        return full if n is None else full[:n]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n,), generator=g)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])


def config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                       tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=None,
                       eos_token_id=0, pad_token_id=None)


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) over ``seqs`` (``[n, T]``)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        x = seqs[i: i + batch_size]
        logits = model(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def train(minutes: float = 35.0, batch_size: int = 8, lr: float = 2e-3, seed: int = 0,
          eval_every: int = 250, max_steps: int = 3500):
    """Train the model from scratch and save it to ``MODEL_DIR``; returns (model, history)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    ids = token_ids()
    val = sequences(ids["val"], n=64)
    model = LlamaForCausalLM(config())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps))))
    g = torch.Generator().manual_seed(seed)
    train_ids = ids["train"]
    history, start, best = [], time.perf_counter(), float("inf")
    for step in range(1, max_steps + 1):
        model.train()
        starts = torch.randint(0, len(train_ids) - SEQ_LEN, (batch_size,), generator=g)
        x = torch.stack([train_ids[s: s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0:
            ppl = perplexity(model, val)
            elapsed = time.perf_counter() - start
            history.append({"step": step, "train_loss": float(loss), "val_ppl": ppl, "seconds": elapsed})
            log.info("step %d loss %.3f val ppl %.2f (%.0fs)", step, float(loss), ppl, elapsed)
            flat = len(history) >= 3 and history[-1]["val_ppl"] > 0.99 * history[-3]["val_ppl"]
            best = min(best, ppl)
            if flat or elapsed > minutes * 60:
                break
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR)
    (MODEL_DIR / "history.json").write_text(json.dumps(history, indent=1))
    return model, history


def load():
    """The trained model (cached on disk; trained on first call), in eval mode."""
    from transformers import LlamaForCausalLM

    if not (MODEL_DIR / "config.json").exists():
        train()
    return LlamaForCausalLM.from_pretrained(MODEL_DIR).eval()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=35.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    _, hist = train(minutes=args.minutes)
    log.info("done: %s", hist[-1] if hist else None)
