"""Tests for model.py: prompts, tokenizer, both heads, generation, LoRA, checkpoints, bad input.

Everything runs on a 2-layer, 64-wide Qwen2 with a BPE tokenizer trained on a fake dataset.
"""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M
import reference_model as refm
import backbone
import checkpoint
import common

WORDS = ("red star night river lost city dark moon space king love war story blue iron ghost summer "
         "dream hunter secret road last time heart wild glass").split()


def fake_dataset(n_items=30, n_samples=12, H=6, seed=0):
    rng = np.random.default_rng(seed)
    items = [{}]
    for i in range(1, n_items + 1):
        title = " ".join(rng.choice(WORDS, size=rng.integers(1, 5))).title() + f" ({1960 + i})"
        desc = " ".join(rng.choice(WORDS, size=rng.integers(0, 30)))
        items.append({"raw_id": f"r{i:03d}", "title": title, "description": desc,
                      "average_rating": float(rng.integers(1, 10)) / 2 if i % 3 else None,
                      "rating_number": int(rng.integers(1, 999)) if i % 2 else None})
    hist = rng.integers(1, n_items + 1, size=(n_samples, H))
    for s in range(n_samples):   # left padding with 0 on some rows
        hist[s, : s % 3] = 0
    t_hist = np.sort(rng.integers(1_600_000_000, 1_700_000_000, size=(n_samples, H)), axis=1) * (hist > 0)
    split = SimpleNamespace(user=np.arange(n_samples), hist=hist, hist_rating=(rng.integers(1, 6, size=(n_samples, H)) * (hist > 0)).astype(np.float32),
                            hist_time=t_hist, target=rng.integers(1, n_items + 1, size=n_samples),
                            rating=np.ones(n_samples, np.float32), time=np.full(n_samples, 1_700_100_000))
    ds = SimpleNamespace(name="fake", num_items=n_items, num_users=n_samples, items=items, history=H,
                         domain={"item": "movie", "items": "movies", "verb": "watch"},
                         titles=[""] + [it["title"] for it in items[1:]], train=split, valid=split, test=split)
    ds.split = lambda name: getattr(ds, name)
    return ds


TINY = dict(layers=2, heads=4, kv_heads=2, hidden=64, intermediate=96, vocab=600, max_position=512, seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ds = fake_dataset()
    cache = str(tmp_path_factory.mktemp("tokcache"))
    model, tok = backbone.build_backbone("tiny", ds, TINY, cache_dir=cache, verbose=False)
    return ds, model, tok, cache


def make(built, device="cpu", **kw):
    ds, model, tok, _ = built
    return M.R2ec(model.to(device), tok, ds, impl="torch", **kw)


def plain_hidden(r, ids):
    """Unpadded single-sequence reference: last hidden state after the final norm."""
    x = torch.tensor([ids], device=r.device)
    return r.model(input_ids=x, output_hidden_states=True).hidden_states[-1][0]


# ---------------------------------------------------------------- prompts & tokenizer

def test_format_dt():
    assert common.format_dt(3 * 86400 + 4 * 3600) == "3d 4.0h"
    assert common.format_dt(5 * 3600 + 12 * 60) == "5h 12.0min"
    assert common.format_dt(450) == "7.5min"
    assert common.format_dt(86399) == "1d 0.0h" and common.format_dt(3599) == "1h 0.0min" and common.format_dt(59) == "1.0min"
    assert common.format_dt(3 * 86400 + 86399) == "4d 0.0h" and common.format_dt(10 * 86400 + 1800) == "10d 0.5h"
    assert common.format_dt(86400) == "1d 0.0h" and common.format_dt(3600) == "1h 0.0min" and common.format_dt(-5) == "0.0min"


def test_tokenizer_deterministic_and_cached(tmp_path, capsys):
    ds = fake_dataset(seed=3)
    a = backbone.train_tokenizer(ds, 500, str(tmp_path / "a"), verbose=True)
    b = backbone.train_tokenizer(ds, 500, str(tmp_path / "b"), verbose=False)
    fa, fb = (os.listdir(tmp_path / d) for d in "ab")
    assert fa == fb and open(tmp_path / "a" / fa[0]).read() == open(tmp_path / "b" / fb[0]).read()
    assert "trained BPE tokenizer" in capsys.readouterr().out
    c = backbone.train_tokenizer(ds, 500, str(tmp_path / "a"), verbose=True)   # from cache: no retraining
    assert "trained" not in capsys.readouterr().out
    text = "Below is my historical movies <answer>" + ds.titles[4]
    assert a(text)["input_ids"] == b(text)["input_ids"] == c(text)["input_ids"]
    assert a.decode(a(text)["input_ids"]) == text


def test_prompts_exact(built):
    r = make(built)
    ds = built[0]
    s = ds.valid
    b = 1   # row with one padding slot
    ids = r.split_prompt_ids(s, [b])[0]
    text = r.tok.decode(ids)
    lines = [f"{common.format_dt(s.time[b] - t)} ago: [{ds.titles[i]}] ({float(rt):.1f})"
             for i, rt, t in zip(s.hist[b], s.hist_rating[b], s.hist_time[b]) if i]
    want = ("Analyze in depth and finally recommend next movie I might watch inside <answer> and </answer>.\n"
            "For example, <answer>a movie</answer>.\n\nBelow is my historical movies and ratings (out of 5):\n"
            + "\n".join(lines))
    assert text == f"<|im_start|>user\n{want}<|im_end|>\n<|im_start|>assistant\n"
    assert len(lines) == ds.history - 1
    # item prompt: lines without data omitted, description cut to 100 words, anchor pre-filled
    item = {"raw_id": "x", "title": "A B", "description": " ".join(["w"] * 150), "average_rating": None,
            "rating_number": 7}
    t = M.item_text(item, ds.domain)
    assert t.startswith("Summarize key attributes of the following movie inside <answer> and </answer>.\n\nTitle: A B\n")
    assert "User Rating" not in t and "Number of Buyers: 7\n" in t and t.endswith("\nDescription: " + " ".join(["w"] * 100))
    it_ids = r.item_prompt_ids([2])[0]
    assert r.tok.decode(it_ids).endswith("<|im_start|>assistant\n<answer>")


def test_truncation_drops_oldest_keeps_anchor(built, capsys):
    ds = built[0]
    s = ds.valid
    full = make(built, max_prompt_len=10_000).split_prompt_ids(s, [0])[0]
    r = make(built, max_prompt_len=len(full) - 5)
    common._warned.discard("truncate")
    ids = r.split_prompt_ids(s, [0, 0])
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "2 of 2 user prompts" in err and "dropped their 2 oldest" in err
    text = r.tok.decode(ids[0])
    assert len(ids[0]) <= r.max_prompt_len
    assert "Analyze in depth" in text and f"[{ds.titles[s.hist[0, -1]]}]" in text
    assert text.count(" ago: [") == ds.history - 1                    # exactly the oldest line went
    ro = refm.no_reasoning(r, ids[:1])
    assert ro["input_ids"][0, -len(r.anchor_ids):].tolist() == r.anchor_ids
    r.split_prompt_ids(s, [0])
    assert "warning" not in capsys.readouterr().err                   # once
    with pytest.raises(common.ModelError, match="instruction alone"):
        M.R2ec(r.model, r.tok, ds, max_prompt_len=64).split_prompt_ids(s, [0])


# ---------------------------------------------------------------- both heads

def test_last_index_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert M.last_index(left).tolist() == [4, 4, 4]
    assert M.last_index(right).tolist() == [2, 4, 0]
    mixed = torch.tensor([[0, 1, 1, 1, 0, 0]])   # rollout layout: left-padded prompt, right-padded completion
    assert M.last_index(mixed).tolist() == [3]


def test_pooling_same_under_left_and_right_padding(built, device):
    r = make(built, device)
    seqs = r.item_prompt_ids([3, 7])
    P = max(map(len, seqs))
    hs = []
    for side in ("left", "right"):
        ids = torch.full((2, P), r.pad_id, dtype=torch.long)
        mask = torch.zeros(2, P, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(P - len(s), P) if side == "left" else slice(0, len(s))
            ids[i, sl], mask[i, sl] = torch.tensor(s), 1
        with torch.no_grad():
            hs.append(refm.forward_full(r, ids.to(device), mask.to(device), torch.zeros_like(mask).bool().to(device))[1])
    ref = torch.stack([F.normalize(plain_hidden(r, s)[-1].float(), dim=-1) for s in seqs]).detach()
    torch.testing.assert_close(hs[0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs[1], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.encode_items([3, 7]), ref, atol=1e-5, rtol=1e-5)


def test_one_pass_logprobs_and_h_T(built, device):
    r = make(built, device)
    prompts = r.split_prompt_ids(built[0].valid, [1, 2])
    T = 1.7
    ro, _ = r.decode(prompts, G=2, greedy=False, temperature=T, top_k=20, max_new_tokens=8, seed=1)
    ids, am, cm = ro["input_ids"], ro["attention_mask"], ro["completion_mask"]
    logp_c, h_T, ent_c = r.forward_both(ro, G=2, temperature=T, return_entropy=True)   # [N, C] columns
    pad = torch.zeros(ids.shape[0], ro["prompt_len"], device=ids.device)
    logp, ent = torch.cat([pad, logp_c], 1), torch.cat([pad, ent_c], 1)                  # [N, L]
    # reference: full logits from a plain HF forward with the same position ids
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = r.model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float() / T   # [B, L, V]
    ref = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)
    ref = torch.cat([torch.zeros_like(ref[:, :1]), ref], 1) * cm
    torch.testing.assert_close(logp.detach(), ref, atol=1e-5, rtol=1e-5)
    p = torch.softmax(logits[:, :-1], -1)
    ref_ent = torch.cat([torch.zeros_like(ref[:, :1]), -(p * p.clamp_min(1e-30).log()).sum(-1)], 1) * cm
    torch.testing.assert_close(ent.detach(), ref_ent, atol=1e-4, rtol=1e-4)
    assert (logp[~cm] == 0).all() and (logp[cm] < 0).all()
    # sampling log-probs (KV cache) agree with the one pass on the sampled tokens
    sm = ro["sampled_mask"]
    assert sm.any() and (ro["old_logp"][~sm] == 0).all()
    torch.testing.assert_close(ro["old_logp"][sm], logp.detach()[sm], atol=1e-4, rtol=1e-4)
    # h_T = last hidden state of a plain, unpadded forward over the real tokens
    for b in range(ids.shape[0]):
        real = ids[b][am[b].bool()].tolist()
        want = F.normalize(plain_hidden(r, real)[-1].float(), dim=-1)
        torch.testing.assert_close(h_T[b].detach(), want.detach(), atol=1e-5, rtol=1e-5)
        assert real[-len(r.anchor_ids):] == r.anchor_ids or not ro["cut"][b]
    # gradients reach the backbone through both heads
    (logp.sum() + h_T.sum()).backward()
    assert r.lm_weight.grad is not None and r.lm_weight.grad.abs().sum() > 0
    r.model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- generation

def scripted(r, scripts):
    """Force the LM head to emit scripts[i][step] for row i (then pad), to test stopping."""
    step = {"n": 0}
    V = r.lm_weight.shape[0]

    def logits(h):
        z = torch.zeros(h.shape[0], V, device=h.device)
        for i, s in enumerate(scripts):
            z[i, s[min(step["n"], len(s) - 1)]] = 50.0
        step["n"] += 1
        return z
    r.logits = logits


def test_generation_stops_at_anchor_and_appends_when_cut(built, device):
    r = make(built, device)
    enc = lambda t: r.tok(t, add_special_tokens=False)["input_ids"]
    words = enc("good films")
    a = words + enc(" so <answer>") + enc(" junk")                # writes the anchor mid-script
    b = words * 20                                                   # never does: cut off
    c = words[:2] + [r.tok.eos_token_id] + words                     # ends its turn first
    prompts = r.split_prompt_ids(built[0].valid, [0, 1, 2])
    scripted(r, [a, b, c])
    n_max = len(a) + 3
    ro, _ = r.decode(prompts, max_new_tokens=n_max, greedy=True)
    texts = r.decode_completions(ro)
    assert texts[0] == "good films so <answer>" and not ro["cut"][0]
    assert ro["cut"].tolist() == [False, True, True]
    assert ro["lengths"].tolist() == [len(words) + len(enc(" so <answer>")), n_max + len(r.anchor_ids), 2 + len(r.anchor_ids)]
    assert texts[1].endswith("<answer>") and texts[2] == r.tok.decode(words[:2]) + "<answer>"
    P = ro["prompt_len"]
    for i in range(3):
        n = int(ro["lengths"][i])
        assert ro["completion_mask"][i, P:P + n].all() and not ro["completion_mask"][i, P + n:].any()
        assert (ro["attention_mask"][i, P + n:] == 0).all() and (ro["input_ids"][i, P + n:] == r.pad_id).all()
        assert ro["input_ids"][i, P + n - len(r.anchor_ids):P + n].tolist() == r.anchor_ids or i == 0
    # appended anchor tokens are not "sampled"
    assert int(ro["sampled_mask"][1].sum()) == n_max and int(ro["sampled_mask"][2].sum()) == 2


def test_greedy_deterministic_and_batch_free(built, device):
    r = make(built, device)
    prompts = r.split_prompt_ids(built[0].valid, [1, 2, 3])
    x, _ = r.decode(prompts, greedy=True, max_new_tokens=8)
    y, _ = r.decode(prompts, greedy=True, max_new_tokens=8, seed=123)
    assert torch.equal(x["input_ids"], y["input_ids"])
    solo, _ = r.decode(prompts[2:3], greedy=True, max_new_tokens=8)   # different padding, same tokens
    assert r.decode_completions(solo)[0] == r.decode_completions(x)[2]
    # the log-probs (continuous, prompt-dependent) agree too: left padding + KV cache change nothing
    lp_solo, lp_batch = solo["old_logp"][0, solo["prompt_len"]:], x["old_logp"][2, x["prompt_len"]:]
    torch.testing.assert_close(lp_solo, lp_batch[:len(lp_solo)], atol=1e-5, rtol=1e-5)
    assert (x["old_logp"][0] - x["old_logp"][2]).abs().max() > 1e-4
    pre = r.user_prefix()                                            # the template prefix decode runs once
    assert len(pre) > 5 and all(p[:len(pre)] == pre for p in prompts)
    _, tm = r.encode_users(prompts, 8, batch_size=2)                 # its log examples: prompts 0 and 1
    assert tm["examples"] == {0: r.decode_completions(x)[0], 1: r.decode_completions(x)[1]}


def test_sampling_reproducible_from_seed(built, device):
    r = make(built, device)
    prompts = r.split_prompt_ids(built[0].valid, [4, 5])
    kw = dict(G=2, greedy=False, temperature=2.0, top_k=50, max_new_tokens=6)
    a, b, c = (r.decode(prompts, seed=s, **kw)[0] for s in (7, 7, 8))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["old_logp"], b["old_logp"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].shape[0] == 4
    P = a["prompt_len"]   # group members share the prompt, rows b*G..b*G+G-1
    assert torch.equal(a["input_ids"][0, :P], a["input_ids"][1, :P])
    assert not torch.equal(a["input_ids"][1, :P], a["input_ids"][2, :P])


def test_greedy_first_chain_is_the_greedy_decode(built, device):
    """decode(greedy_first=True): chain 0 of each group is exactly the greedy decode of its prompt, and the
    other chains are exactly the sampled ones of the same seed without it."""
    r = make(built, device)
    prompts = r.split_prompt_ids(built[0].valid, [4, 5, 7])
    kw = dict(G=3, greedy=False, temperature=2.0, top_k=50, max_new_tokens=6, seed=7)
    mixed, h_mixed = r.decode(prompts, greedy_first=True, **kw)
    sampled, _ = r.decode(prompts, **kw)
    greedy, h_greedy = r.decode(prompts, greedy=True, max_new_tokens=6)
    texts, s_texts, g_texts = (r.decode_completions(x) for x in (mixed, sampled, greedy))
    assert [texts[i] for i in (0, 3, 6)] == g_texts
    assert [texts[i] for i in (1, 2, 4, 5, 7, 8)] == [s_texts[i] for i in (1, 2, 4, 5, 7, 8)]
    assert [s_texts[i] for i in (0, 3, 6)] != g_texts                 # at T = 2 sampling differs from greedy
    torch.testing.assert_close(h_mixed[::3], h_greedy, atol=1e-4, rtol=1e-4)


def test_decode_cache_in_place_is_dynamic_cache(built, device):
    """decode() without grad writes its tokens into new_cache's spare room; with grad it uses transformers'
    DynamicCache: the same chains, log-probs and h_T. A cache with too little room grows and stays exact."""
    r = make(built, device)
    prompts = r.split_prompt_ids(built[0].valid, [1, 4, 6])
    kw = dict(G=3, greedy=False, temperature=1.5, top_k=20, max_new_tokens=7, seed=3, greedy_first=True)
    with torch.no_grad():
        a, ha = r.decode(prompts, **kw)
    with torch.enable_grad():
        b, hb = r.decode(prompts, **kw)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["old_logp"], b["old_logp"])
    torch.testing.assert_close(ha, hb, atol=1e-5, rtol=1e-5)
    ids, mask = r.pad_left(prompts)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randint(5, 200, (3, n), generator=g).to(r.device) for n in (1, 3, 1, 2)]
    outs = []
    with torch.no_grad():
        for room in (0, 2):   # room 2 < the 7 tokens fed: the buffer regrows twice
            cache, m, p = backbone.new_cache(r.model, room), mask, pos
            hs = [r.hidden(ids, m, p, cache)[:, -1]]
            if room:
                assert type(cache.layers[0]).__name__ == "RoomyLayer"
            for t in steps:
                m = torch.cat([m, torch.ones_like(t)], 1)
                p = p[:, -1:] + torch.arange(1, t.shape[1] + 1, device=r.device)
                hs.append(r.hidden(t, m, p, cache)[:, -1])
            outs.append(torch.stack(hs))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- item table

def test_item_encoding_independent_of_batch_and_order(built, device):
    r = make(built, device)
    ids = [5, 1, 30, 2, 17, 9, 4]
    full = r.encode_items(ids, batch_size=64)
    torch.testing.assert_close(r.encode_items(ids, batch_size=2), full, atol=1e-5, rtol=1e-5)
    rev = r.encode_items(ids[::-1], batch_size=3)
    torch.testing.assert_close(rev.flip(0), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(len(ids), device=full.device))
    assert not full.requires_grad and r.encode_items(ids[:2], grad=True).requires_grad
    r.refresh_items(batch_size=8, verbose=False)
    E = r.table.E
    assert E.shape == (31, 64) and (E[0] == 0).all() and r.table.fresh
    torch.testing.assert_close(E[ids], full, atol=1e-5, rtol=1e-5)
    r.table.update([2, 3], -full[:2])
    torch.testing.assert_close(E[[2, 3]], -full[:2])
    s = r.scores(full[:1])
    assert s.shape == (1, 31) and s[0, 0] == float("-inf")
    torch.testing.assert_close(s[0, 5], torch.tensor(1 / r.tau, device=s.device), atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------- LoRA & checkpoints

def fresh_tiny(built, tmp_path):
    ds, _, _, cache = built
    m, t = backbone.build_backbone("tiny", ds, TINY, cache_dir=cache, verbose=False)
    return m, t


def test_lora_zero_is_base_and_merge_preserves(built, tmp_path):
    ds = built[0]
    base, tok = fresh_tiny(built, tmp_path)
    ref_model, _ = fresh_tiny(built, tmp_path)
    x = torch.tensor([M.R2ec(base, tok, ds).item_prompt_ids([1])[0]])
    want = ref_model(input_ids=x).logits
    params = backbone.apply_lora(base, r=4, alpha=8.0, dropout=0.0)
    assert len(params) == 2 * 7 * TINY["layers"] and all(p.requires_grad for p in params)
    assert not base.get_input_embeddings().weight.requires_grad
    assert torch.equal(base(input_ids=x).logits, want)                # B = 0: exactly the base model
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.05)
    lora_out = base(input_ids=x).logits
    assert (lora_out - want).abs().max() > 1e-3
    ref_model.load_state_dict(backbone.merged_state_dict(base))
    torch.testing.assert_close(ref_model(input_ids=x).logits, lora_out, atol=1e-4, rtol=1e-4)
    assert backbone.apply_lora(ref_model, r=0) == list(ref_model.parameters())   # r=0: full fine-tuning


def test_lora_linear_paths_agree():
    """LoRALinear's fp32 fast paths (no grad: adapter folded into one GEMM; grad: addmm) equal the plain
    W x + b + s B A x, values and gradients, on an irregular shape with a bias."""
    torch.manual_seed(0)
    lin = backbone.LoRALinear(torch.nn.Linear(13, 7), r=3, alpha=6.0)
    torch.nn.init.normal_(lin.lora_B, 0, 0.3)
    x = torch.randn(2, 5, 13)
    A, B, W, b = lin.lora_A, lin.lora_B, lin.base.weight, lin.base.bias
    ref = x @ W.T + b + 2.0 * (x @ A.T) @ B.T
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref.detach(), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), [A, B])
    got = torch.autograd.grad((lin(x) * g).sum(), [A, B])
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)
    lin.drop.p = 0.5                                      # dropout: the general path, identity in eval mode
    lin.eval()
    torch.testing.assert_close(lin(x), ref, atol=1e-5, rtol=1e-5)


def test_lora_on_gpt2_conv1d(built, tmp_path):
    """An architecture without Llama-style names (GPT-2: Conv1D c_attn / c_proj / c_fc, weight [in, out]): LoRA
    wraps every projection of its blocks, starts as the base model, and merges back in Conv1D's layout."""
    from transformers import GPT2Config, GPT2LMHeadModel
    ds, _, tok, _ = built
    cfg = GPT2Config(vocab_size=len(tok), n_embd=24, n_layer=2, n_head=2, n_positions=512,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model, ref = GPT2LMHeadModel(cfg).eval(), GPT2LMHeadModel(cfg).eval()   # eval: no dropout
    ref.load_state_dict(model.state_dict())
    x = torch.tensor([M.R2ec(model, tok, ds).item_prompt_ids([1])[0]])
    want = ref(input_ids=x).logits
    params = backbone.apply_lora(model, r=2, alpha=4.0)
    names = {n.rsplit(".", 2)[-2] for n, m in model.named_modules() if isinstance(m, backbone.LoRALinear) for n in [n + ".x"]}
    assert names == {"c_attn", "c_proj", "c_fc"} and len(params) == 2 * 4 * 2
    torch.testing.assert_close(model(input_ids=x).logits, want)   # B = 0: the base model
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.1)
        fast = model(input_ids=x).logits                          # no grad: the folded Conv1D path
    slow = model(input_ids=x).logits                              # grad: the addmm path
    assert (slow - want).abs().max() > 1e-3
    torch.testing.assert_close(fast, slow.detach(), atol=1e-4, rtol=1e-4)
    ref.load_state_dict(backbone.merged_state_dict(model))
    torch.testing.assert_close(ref(input_ids=x).logits, slow, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoint_round_trip(built, tmp_path, lora):
    ds = built[0]
    model, tok = fresh_tiny(built, tmp_path)
    if lora:
        for p in backbone.apply_lora(model, r=2, alpha=4.0)[1::2]:
            torch.nn.init.normal_(p, 0, 0.05)
    else:
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)    # "trained": differs from a fresh init
    r = M.R2ec(model, tok, ds, tau=0.05, impl="torch")
    r.refresh_items(batch_size=16, verbose=False)
    ro, h_dec = r.decode(r.split_prompt_ids(ds.valid, [0, 1, 2]), max_new_tokens=0)
    with torch.no_grad():
        h = r.forward_both(ro)[1]
    path = str(tmp_path / "ckpt")
    os.makedirs(path)   # a folder of the older layout: replaced atomically
    cfg0 = {"tau": 0.05, "lr": 1e-4, "dataset": "fake", "history": 6, "init_from": "tiny"}
    checkpoint.save_checkpoint(path, r, cfg0, train_state={"step": 7, "rng": torch.get_rng_state()})
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "run_config.json", "item_map.json", "item_table.safetensors",
            "train_state.pt", "tokenizer.json"} <= files and ("adapter.safetensors" in files) == lora
    hidden = [f for f in os.listdir(tmp_path) if f.startswith(".")]
    assert os.path.islink(path) and hidden == [os.readlink(path)]   # no leftovers of the swap
    imap = json.load(open(os.path.join(path, "item_map.json")))
    assert imap["items"][4] == {"id": 5, "raw_id": "r005", "title": ds.titles[5]}
    r2, cfg = checkpoint.load_checkpoint(path, dataset=ds)
    extra = checkpoint.load_train_state(path)
    r2.impl = "torch"
    assert cfg["lr"] == 1e-4 and r2.tau == 0.05 and extra["step"] == 7 and torch.equal(r2.table.E, r.table.E)
    assert r2.split_prompt_ids(ds.valid, [0, 1, 2]) == r.split_prompt_ids(ds.valid, [0, 1, 2])
    with torch.no_grad():
        h2 = r2.forward_both(ro)[1]
        h2_dec = r2.decode(r2.split_prompt_ids(ds.valid, [0, 1, 2]), max_new_tokens=0)[1]
        E2 = r2.encode_items(range(1, 31), batch_size=16)
    tol = dict(atol=1e-5, rtol=1e-5) if lora else dict(atol=0, rtol=0)
    torch.testing.assert_close(h2, h, **tol)
    torch.testing.assert_close(h2_dec, h_dec, **tol)
    torch.testing.assert_close(r2.scores(h2), r.scores(h), **({"atol": 1e-3, "rtol": 1e-5} if lora else tol))
    torch.testing.assert_close(E2, r.table.E[1:], **tol)
    other = fake_dataset(seed=9)
    other.items[3]["raw_id"] = "zzz"
    with pytest.raises(common.ModelError, match="item map"):
        checkpoint.load_checkpoint(path, dataset=other)


def test_hf_directory_loads(built, tmp_path, capsys):
    """A tiny Llama-architecture model + tokenizer saved to a directory loads through init_from=DIR."""
    from transformers import LlamaConfig, LlamaForCausalLM
    ds, _, tok, _ = built
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    src = LlamaForCausalLM(cfg)
    d = tmp_path / "llama"
    src.save_pretrained(d)
    tok.save_pretrained(d)
    model, tok2 = backbone.build_backbone(str(d), ds, device="cpu", verbose=False)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    r = M.R2ec(model, tok2, ds, impl="torch")
    x = torch.tensor([r.item_prompt_ids([2])[0]])
    torch.testing.assert_close(model(input_ids=x).logits, src(input_ids=x).logits)
    ro, _ = r.decode(r.split_prompt_ids(ds.valid, [0, 1]), G=2, greedy=False, max_new_tokens=5, seed=0)
    assert ro["input_ids"].shape[0] == 4 and ro["cut"].all()
    # a tokenizer without a chat template: plain template, one warning
    cfg_path = d / "tokenizer_config.json"
    tc = json.load(open(cfg_path))
    tc.pop("chat_template", None)
    json.dump(tc, open(cfg_path, "w"))
    for f in os.listdir(d):
        if f.endswith(".jinja"):
            os.remove(d / f)
    common._warned.discard("template")
    capsys.readouterr()
    _, tok3 = backbone.build_backbone(str(d), ds, verbose=False)
    _, tok3 = backbone.build_backbone(str(d), ds, verbose=False)
    assert capsys.readouterr().err.count("no chat template") == 1
    assert M.R2ec(model, tok3, ds).chat("hi") == "User: hi\n\nAssistant: "


def test_bad_inputs(built, tmp_path):
    ds, model, tok, _ = built
    with pytest.raises(common.ModelError, match="not 'tiny'"):
        backbone.build_backbone(str(tmp_path / "nope"), ds)
    with pytest.raises(common.ModelError, match="no such .gguf"):
        backbone.build_backbone(str(tmp_path / "x.gguf"), ds)
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.ModelError, match="no config.json"):
        backbone.build_backbone(str(tmp_path / "empty"), ds)
    d = tmp_path / "notok"
    model.save_pretrained(d)                                       # weights and config, no tokenizer
    with pytest.raises(common.ModelError, match="no tokenizer files") as e:
        backbone.build_backbone(str(d), ds)
    assert "\n" not in str(e.value)
    with pytest.raises(common.ModelError, match="needs a dataset"):
        backbone.build_backbone("tiny", None)
    bad = fake_dataset()
    bad.items[4]["title"] = "  "
    r = M.R2ec(model, tok, bad)
    with pytest.raises(common.ModelError, match="item 4 .*empty title"):
        r.encode_items([1, 4])
    with pytest.raises(common.ModelError, match="not a checkpoint"):
        checkpoint.load_checkpoint(str(tmp_path / "empty"))


def test_with_real_synthetic_dataset(tmp_path):
    data = pytest.importorskip("data")
    ds = data.load_dataset("synthetic:40x30", cache_dir=str(tmp_path), verbose=False)
    model, tok = backbone.build_backbone("tiny", ds, TINY, cache_dir=str(tmp_path / "tok"), verbose=False)
    r = M.R2ec(model, tok, ds, impl="torch")
    h = r.encode_items([1, 2, 3])
    assert h.shape == (3, 64) and torch.isfinite(h).all()
    ro, _ = r.decode(r.split_prompt_ids(ds.train, [0, 1]), G=2, greedy=False, max_new_tokens=4, seed=0)
    assert ro["input_ids"].shape[0] == 4
    text = r.tok.decode(r.split_prompt_ids(ds.train, [len(ds.train) - 1])[0])
    assert "ago: [" in text and "next movie I might watch" in text


def test_bf16_lora_generate_and_backward(built, device):
    """The GPU configuration (bf16 backbone, fp32 LoRA adapter) runs end to end with gradients."""
    ds, _, _, cache = built
    model, tok = backbone.build_backbone("tiny", ds, TINY, cache_dir=cache, dtype=torch.bfloat16, device=device,
                                  verbose=False)
    params = backbone.apply_lora(model, r=2, alpha=4.0, dropout=0.1)
    r = M.R2ec(model, tok, ds, impl="torch")
    ro, _ = r.decode(r.split_prompt_ids(ds.train, [1, 2]), G=2, greedy=False, temperature=2.0, top_k=50,
                     max_new_tokens=4, seed=0)
    model.train()
    logp, h_T, _ = r.forward_both(ro, G=2, temperature=2.0)
    h_v = r.encode_items([3, 4], grad=True)
    assert logp.dtype == h_T.dtype == h_v.dtype == torch.float32 and torch.isfinite(logp).all()
    (logp.sum() + (h_T[:2] * h_v).sum()).backward()
    assert all(p.grad is not None for p in params[1::2]) and any(p.grad.abs().sum() > 0 for p in params[1::2])
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
