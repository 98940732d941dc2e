"""A tiny LLaMA (GQA) built from a config and byte tokens of offline text, for the
``llm_structured`` example recipe (no downloads; runs in seconds).

The text is CPython's bundled ``pydoc_data.topics``; a token is one UTF-8 byte (vocabulary 256).
``make_model`` builds the model from ``LlamaConfig`` and trains it briefly (seeded), so that
perplexity, and what pruning costs of it, mean something.
"""

import functools

import torch

SEQ = 64


@functools.lru_cache(maxsize=1)
def _stream() -> torch.Tensor:
    import pydoc_data.topics

    text = "\n\n".join(v for _, v in sorted(pydoc_data.topics.topics.items()))
    return torch.tensor(list(text.encode("utf-8")[:400_000]), dtype=torch.long)


def _windows(start: int, n: int) -> torch.Tensor:
    s = _stream()[start:start + n * SEQ]
    return s.view(n, SEQ)


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    stream = _stream()[:300_000]
    model.train()
    for _ in range(30):
        starts = torch.randint(0, len(stream) - SEQ, (8,), generator=g).tolist()
        x = torch.stack([stream[s:s + SEQ] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_batches():
    """Calibration / distillation batches: 8 x [4, 64] byte windows of the training text."""
    return list(_windows(0, 32).split(4))


def heldout():
    """Held-out windows [16, 64], from text the model was not trained on."""
    return _windows(320_000, 16)
