"""Peers for benchmarks/llm_oneshot.py (not a test): torchao 0.18 ``WandaSparsifier`` on the same
model and the same calibration sequences (saved by llm_oneshot.py). Run in the peers' venv:

    /work/venvs/llmc/bin/python benchmarks/llm_oneshot_peers.py     # torch==2.13.0, torchao==0.18.0

Writes benchmarks/results/llm_oneshot_peers.json. (llm-compressor 0.14 is installed in the same
venv but was not run in this session: see the README.)
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llm_model  # noqa: E402

OUT = Path(__file__).parent / "results"


def main():
    from torchao.sparsity.wanda import WandaSparsifier

    torch.set_num_threads(1)
    base = llm_model.load()
    test = llm_model.sequences(llm_model.token_ids()["test"], n=32)
    rows = []
    for seed in (0, 1, 2):
        seqs = torch.load(OUT / f"llm_oneshot_calib_seed{seed}.pt", weights_only=True)
        for setting, block in (("50%", None), ("2:4", 4)):
            model = llm_model.load()
            names = [n + ".weight" for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
            t = time.perf_counter()
            sp = WandaSparsifier(sparsity_level=0.5, semi_structured_block_size=block)
            sp.prepare(model, config=[{"tensor_fqn": n} for n in names])
            with torch.no_grad():
                for b in seqs.split(4):
                    model(input_ids=b)
            sp.step()
            sp.squash_mask()
            seconds = time.perf_counter() - t
            rows.append({"seed": seed, "setting": setting, "method": "torchao WandaSparsifier",
                         "ppl": llm_model.perplexity(model, test), "calib_seconds": seconds})
            print(rows[-1], flush=True)
    (OUT / "llm_oneshot_peers.json").write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
