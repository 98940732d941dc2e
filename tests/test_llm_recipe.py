"""`gradprune run llm.yaml`: the llm_structured workflow scores, searches, exports, distils and
evaluates a tiny LLaMA (built from a config, byte tokens of offline text); bad recipes fail in
one line before any work."""

import json
import pathlib
import shutil
import sys

import pytest
import torch

from gradprune import cli

transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"


@pytest.fixture
def recipe_dir(tmp_path):
    for name in ("llm.yaml", "tiny_llm.py"):
        shutil.copy(RECIPES / name, tmp_path / name)
    yield tmp_path
    sys.modules.pop("tiny_llm", None)


def test_llm_recipe_scores_searches_exports_distils_and_evaluates(recipe_dir, capsys):
    assert cli.main(["run", str(recipe_dir / "llm.yaml")]) == 0, capsys.readouterr().err
    out = recipe_dir / "out" / "llm"
    report = json.loads((out / "report.json").read_text())
    assert report["workflow"] == "llm_structured" and report["method"] == "gradnas"
    dense, oneshot, distilled = report["dense"], report["oneshot"], report["distilled"]
    assert oneshot["params"] == distilled["params"] == report["searched_params"] <= 0.75 * dense["params"]
    for m in (dense, oneshot, distilled):
        assert 1.0 < m["ppl"] < 256.0 and m["prefill_ms"] > 0 and m["decode_tokens_per_s"] > 0
    assert report["distill"]["steps"] == 10
    assert report["flops"] < report["dense_flops"]
    # a uniform search: plain from_pretrained loads it, with the searched size and the report's ppl
    assert report["uniform"] and report["loads_with"] == "AutoModelForCausalLM.from_pretrained"
    small = transformers.AutoModelForCausalLM.from_pretrained(out / "pruned")
    assert sum(p.numel() for p in small.parameters()) == oneshot["params"]
    assert (out / "pruned" / "model.safetensors").exists()
    sys.path.insert(0, str(recipe_dir))
    try:
        import tiny_llm
        from gradprune.llm_structured import perplexity
        assert perplexity(small, tiny_llm.heldout()) == pytest.approx(distilled["ppl"], rel=1e-4)
    finally:
        sys.path.remove(str(recipe_dir))
    rows = report["layers"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert all(r["mlp"] == small.config.intermediate_size for r in rows)
    assert (out / "widths.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| distilled |" in md and "decode tokens/s" in md


@pytest.mark.slow
def test_llm_recipe_depth_axis_drops_layers(recipe_dir, capsys):
    text = (recipe_dir / "llm.yaml").read_text()
    text = text.replace("method: gradnas", "method: block_influence").replace("axes: [heads, mlp]", "axes: [layers]")
    text = text.replace("steps: 10", "steps: 0").replace("out/llm", "out/depth")
    (recipe_dir / "depth.yaml").write_text(text)
    assert cli.main(["run", str(recipe_dir / "depth.yaml")]) == 0, capsys.readouterr().err
    report = json.loads((recipe_dir / "out" / "depth" / "report.json").read_text())
    dropped = [r["layer"] for r in report["layers"] if not r["kept"]]
    assert dropped and "distilled" not in report
    small = transformers.AutoModelForCausalLM.from_pretrained(recipe_dir / "out" / "depth" / "pruned")
    assert small.config.num_hidden_layers == 4 - len(dropped)


def test_llm_recipe_combined_axes_with_measured_and_counted_budgets(recipe_dir, capsys):
    from gradprune.llm_structured import validate_section

    sec = validate_section({"constraints": {"params": "60%", "kv_cache": "80%", "latency": "90%",
                                            "decode_latency": 5.0},
                            "axes": ["heads", "mlp", "hidden", "layers", "experts"]})
    assert sec["method"] == "gradnas" and sec["axes"] == ["heads", "mlp", "hidden", "layers", "experts"]
    assert validate_section({"constraints": {"params": "60%"}, "axes": ["hidden"],
                             "method": "activation"})["method"] == "activation"
    # a real run: layers + MLP widths to 80% params and a generous decode bound in ms (measured)
    text = (recipe_dir / "llm.yaml").read_text()
    text = text.replace('constraints: {params: "75%"}', 'constraints: {params: "80%", decode_latency: 10000}')
    text = text.replace("axes: [heads, mlp]", "axes: [layers, mlp]").replace("steps: 10", "steps: 0")
    text = text.replace("out/llm", "out/combined")
    (recipe_dir / "combined.yaml").write_text(text)
    assert cli.main(["run", str(recipe_dir / "combined.yaml")]) == 0, capsys.readouterr().err
    report = json.loads((recipe_dir / "out" / "combined" / "report.json").read_text())
    assert report["axes"] == ["layers", "mlp"] and report["searched_params"] <= 0.8 * report["dense"]["params"]
    small = transformers.AutoModelForCausalLM.from_pretrained(recipe_dir / "out" / "combined" / "pruned")
    assert sum(p.numel() for p in small.parameters()) == report["searched_params"]


BASE = ("workflow: llm_structured\nmodel: tiny_llm:make_model\ndata: tiny_llm:train_batches\n"
        "eval_data: tiny_llm:heldout\n")


@pytest.mark.parametrize("body, needle", [
    (BASE + "llm: {constraints: {params: '50%'}, method: taylr}\n",
     "llm.method must be one of gradnas, taylor, fisher, michel, activation, magnitude; got 'taylr'"),
    (BASE + "llm: {constraints: {params: '50%'}, axes: [layers], method: taylor}\n",
     "llm.method must be one of gradnas, block_influence, loss_drop"),
    (BASE + "llm: {constraints: {params: '50%'}, axes: [layrs]}\n", "unknown axis 'layrs'"),
    (BASE + "llm: {constraints: {params: '50%'}, axes: [layers, mlp], method: taylor}\n",
     "combining axes ['layers', 'mlp'] needs method gradnas"),
    (BASE + "llm: {constraints: {params: '50%'}, axes: [hidden], method: block_influence}\n",
     "llm.method must be one of gradnas, activation"),
    (BASE + "llm: {constraints: {params: '50%'}, axes: [experts], method: taylor}\n",
     "llm.method must be one of gradnas, reap, frequency"),
    (BASE + "llm: {constraints: {decode_latency: '0%'}}\n",
     "constraints['decode_latency'] must be a percentage in (0%, 100%]"),
    (BASE + "llm: {constraints: {parms: '50%'}}\n", "unknown key 'parms'"),
    (BASE + "llm: {method: gradnas}\n", "llm needs constraints"),
    (BASE + "llm: {constraints: {params: '50%'}, steps: 3}\n", "unknown llm key(s) 'steps'"),
    (BASE + "llm: {constraints: {params: '50%'}, distill: {stpes: 3}}\n", "unknown distill option(s) 'stpes'"),
    (BASE + "llm: {constraints: {params: '50%'}, distill: {steps: -1}}\n", "llm.distill.steps"),
    (BASE + "llm: {constraints: {params: '50%'}, eval: {decode: 3}}\n", "unknown llm.eval key(s) 'decode'"),
    (BASE + "llm: {constraints: {params: '50%'}, uniform: 1}\n", "llm.uniform must be bool"),
    ("workflow: llm_structured\nmodel: tiny_llm:make_model\nllm: {constraints: {params: '50%'}}\n",
     "needs data:"),
    ("workflow: search\nmodel: tiny_llm:make_model\neval_data: tiny_llm:heldout\n"
     "search: {constraints: {params: '50%'}, example_input: tiny_llm:heldout}\n",
     "eval_data applies to workflow 'llm_structured' only"),
])
def test_bad_llm_recipes_fail_in_one_line_before_running(recipe_dir, capsys, body, needle, monkeypatch):
    built = []
    monkeypatch.setattr("gradprune.recipes._build", lambda *a, **k: built.append(1))
    path = recipe_dir / "bad.yaml"
    path.write_text(body)
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradprune: error:") and len(err.splitlines()) == 1
    assert needle in err, err
    assert not built and not (recipe_dir / "bad-out").exists()


def test_layer_widths_of_a_width_and_depth_search():
    import gradprune as gp
    from gradprune.llm_structured import layer_widths, perplexity

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = [torch.randint(0, 64, (2, 12)) for _ in range(2)]
    found = gp.search(model, {"params": "70%"}, ids, lambda m, b: m(b, labels=b).loss,
                      example_input=ids[0], axes=("layers", "heads", "mlp"))
    rows = layer_widths(found)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert [r["layer"] for r in rows if not r["kept"]] == found.dropped_layers
    small = found.export()
    kept_rows = [r for r in rows if r["kept"]]
    assert [r["mlp"] for r in kept_rows] == [layer.mlp.down_proj.in_features for layer in small.model.layers]
    assert all(r["mlp_total"] == 64 and r["heads_total"] == 2 for r in rows)
    with pytest.raises(TypeError, match="seqs must be a 2-D tensor"):
        perplexity(model, ids[0][0])


def test_llm_recipe_scores_with_the_chunked_loss_by_default(monkeypatch, recwarn):
    import gradprune as gp
    import gradprune.structured as structured
    from gradprune import llm_structured
    from gradprune.structured.lm_loss import CausalLMLoss

    # the recipe's default is the library's chunked loss, gp.causal_lm_loss() already called
    default = llm_structured.causal_lm_loss
    assert isinstance(default, CausalLMLoss) and default.chunk == gp.causal_lm_loss().chunk == "auto"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = [torch.randint(0, 64, (2, 12)) for _ in range(2)]
    plain = model(ids[0], labels=ids[0]).loss
    assert torch.allclose(default(model, ids[0]), plain, atol=1e-6)
    assert torch.allclose(default(model, {"input_ids": ids[0]}), plain, atol=1e-6)

    seen, real = [], structured.search

    def spy(model, constraints, data, loss_fn, **kw):
        seen.append(loss_fn)
        return real(model, constraints, data, loss_fn, **kw)

    monkeypatch.setattr(structured, "search", spy)
    sec = llm_structured.validate_section({"constraints": {"params": "80%"}, "distill": {"steps": 0},
                                           "max_iter_data_loader": 2,
                                           "eval": {"prompt_len": 4, "decode_tokens": 2, "repeats": 1}})
    chunked, _ = llm_structured.run(model, ids, sec, {})
    assert seen == [default]
    assert not [w for w in recwarn if "causal_lm_loss(" in str(w.message)]  # chunked: no fallback
    # the same subnet as scoring with the plain loss (the same gradients, up to float rounding)
    unchunked, _ = llm_structured.run(model, ids, sec, {}, loss_fn=lambda m, b: m(b, labels=b).loss)
    assert seen[1] is not default
    assert chunked["searched_params"] == unchunked["searched_params"] <= 0.8 * chunked["dense"]["params"]
    assert chunked["layers"] == unchunked["layers"]
