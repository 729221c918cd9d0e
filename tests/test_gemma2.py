"""Gemma-2 support: final-logit soft-capping in every token_logprobs path and in R2ec (logits for sampling,
forward_both's log-probs), eager attention for soft-capped attention, and a tiny random Gemma-2 saved as a
Hugging Face directory loading through build_backbone (its own logits are the reference).

Shapes are small and irregular on purpose (37 rows, V = 301, d = 24: tail tiles, d % BK != 0); the Triton
kernels run under the interpreter on CPU.
"""
import pytest
import torch

import model as M
from kernels.logprobs import token_logprobs
from test_model import fake_dataset
import backbone

IMPLS = ["reference", "torch", "chunked", "triton"]


def capped_reference(h, W, y, t, c):
    """Plain torch ops in float64: log_softmax(c tanh(h W^T / c) / t)."""
    z = c * torch.tanh((h @ W.T) / c) / t
    lp_all = torch.log_softmax(z, -1)
    return lp_all.gather(-1, y[..., None]).squeeze(-1), -(lp_all.exp() * lp_all).sum(-1)


def make(T=37, V=301, d=24, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) * 1.5          # raw logits ~ +-7: well into tanh's bend at c = 5
    y = torch.randint(0, V, (T,), generator=g)
    gl, ge = torch.randn(T, generator=g), torch.randn(T, generator=g)
    return [x.to(device) for x in (h, W, y, gl, ge)]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [0.7, 1.3])
def test_softcap_values_entropy_grads(impl, t, device):
    c = 5.0
    h, W, y, gl, ge = make(device=device)
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[::5] = False
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    logp, ent = token_logprobs(hh, WW, y, t, mask=mask, return_entropy=True, impl=impl, softcap=c)
    ((logp * gl).sum() + (ent * ge).sum()).backward()
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    rl, re = capped_reference(h64, W64, y, t, c)
    rl, re = rl * mask, re * mask
    ((rl * gl.double()).sum() + (re * ge.double()).sum()).backward()
    torch.testing.assert_close(logp.double(), rl.detach(), atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), re.detach(), atol=3e-5, rtol=1e-5)
    assert (logp[~mask] == 0).all() and (hh.grad[~mask] == 0).all()
    assert rel(hh.grad, h64.grad) < 2e-5 and rel(WW.grad, W64.grad) < 2e-5
    # the cap matters at these shapes: the uncapped log-probs are far off
    unc = torch.log_softmax((h64 @ W64.T) / t, -1).gather(1, y[:, None]).squeeze(1) * mask
    assert (unc - rl).abs().max() > 0.5


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_frozen_head(impl, device):
    """LoRA case: W without grad, no entropy (the PyTorch paths take dh from the forward's q)."""
    c, t = 5.0, 0.9
    h, W, y, gl, _ = make(seed=1, device=device)
    hh = h.clone().requires_grad_()
    (token_logprobs(hh, W, y, t, impl=impl, softcap=c) * gl).sum().backward()
    h64 = h.double().requires_grad_()
    (capped_reference(h64, W.double(), y, t, c)[0] * gl.double()).sum().backward()
    assert rel(hh.grad, h64.grad) < 2e-5


def test_softcap_off_and_checked(device):
    h, W, y, _, _ = make(T=5, V=40, d=8, device=device)
    base = token_logprobs(h, W, y, 1.1, impl="torch")
    for off in (0, 0.0, None):
        assert torch.equal(token_logprobs(h, W, y, 1.1, impl="torch", softcap=off), base)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            token_logprobs(h, W, y, 1.1, softcap=bad)


# ---------------------------------------------------------------- a tiny random Gemma-2 through build_backbone

@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A 2-layer random Gemma-2 (both soft-caps on) + the fake dataset's BPE tokenizer, saved as an HF directory.
    The tied embedding is scaled up so the LM head's raw logits reach well past the final cap (30)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    ds = fake_dataset()
    tok = backbone.train_tokenizer(ds, 320, cache_dir=str(tmp_path_factory.mktemp("tok")), verbose=False)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                       sliding_window=512, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                       bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        src = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        src.get_input_embeddings().weight.mul_(200.0)
    d = tmp_path_factory.mktemp("gemma2")
    src.save_pretrained(d)
    tok.save_pretrained(d)
    return ds, str(d)


def plain_logits(r, ro):
    ids, am = ro["input_ids"], ro["attention_mask"]
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return r.model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float(), pos


def test_gemma2_eager_and_final_softcap(gemma_dir, device):
    ds, d = gemma_dir
    model, tok = backbone.build_backbone(d, ds, device=device, verbose=False)
    assert type(model).__name__ == "Gemma2ForCausalLM"
    assert getattr(model.config, "_attn_implementation", None) == "eager"
    r = M.R2ec(model, tok, ds)                      # impl auto: the Triton kernels (interpreter on CPU)
    assert r.softcap == 30.0
    T = 1.3
    ro, _ = r.decode(r.split_prompt_ids(ds.valid, [1, 2]), G=2, greedy=False, temperature=T, max_new_tokens=6,
                     seed=0)
    logits, pos = plain_logits(r, ro)               # HF soft-caps its own output logits
    ids, am, P = ro["input_ids"], ro["attention_mask"], ro["prompt_len"]
    with torch.no_grad():
        h = r.hidden(ids, am, pos)
        torch.testing.assert_close(r.logits(h), logits, atol=2e-4, rtol=1e-5)   # .logits (used to sample)
        raw = torch.nn.functional.linear(h, r.lm_weight).float()
    assert raw.abs().max() > 60 and logits.abs().max() <= 30   # the cap is active at these weights
    logp, h_T, ent = r.forward_both(ro, G=2, temperature=T, return_entropy=True)
    lp_all = torch.log_softmax(logits[:, P - 1:-1] / T, -1)                      # predicts completion tokens
    cm = ro["completion_mask"][:, P:]
    ref = lp_all.gather(2, ids[:, P:, None]).squeeze(2) * cm
    ref_ent = -(lp_all.exp() * lp_all).sum(-1) * cm
    torch.testing.assert_close(logp.detach(), ref, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(ent.detach(), ref_ent, atol=5e-5, rtol=1e-5)
    unc = torch.log_softmax(raw[:, P - 1:-1] / T, -1).gather(2, ids[:, P:, None]).squeeze(2) * cm
    assert (unc - ref).abs().max() > 0.1
    # sampling (cached, .logits) and the one pass agree on the sampled tokens
    sm = ro["sampled_mask"][:, P:]
    assert sm.any()
    torch.testing.assert_close(ro["old_logp"][:, P:][sm], logp.detach()[sm], atol=1e-4, rtol=1e-4)
    # h_T: the last hidden state of the real tokens
    last = am.shape[1] - 1 - am.flip(-1).argmax(-1)
    torch.testing.assert_close(h_T.detach(), torch.nn.functional.normalize(h[torch.arange(len(last)), last], dim=-1),
                               atol=1e-5, rtol=1e-5)


def test_eager_attention_kw():
    assert backbone.eager_attention_kw({"model_type": "gemma2"}) == {"attn_implementation": "eager"}
    assert backbone.eager_attention_kw({"model_type": "x", "attn_logit_softcapping": 50.0}) == {"attn_implementation": "eager"}
    assert backbone.eager_attention_kw({"model_type": "llama", "attn_logit_softcapping": None}) == {}


# ---------------------------------------------------------------- gradient checkpointing: full rows, same numbers

def make_backbone(kind, gemma_dir, tmp_path):
    """-> (R2ec, trainable params): the built-in tiny Qwen2 (full fine-tuning, tied head trained), a tiny
    HF Llama directory with LoRA (frozen embeddings: the input-require-grads hook), or the Gemma-2 one."""
    ds, gdir = gemma_dir
    if kind == "tiny":
        model, tok = backbone.build_backbone("tiny", ds, dict(layers=2, heads=2, kv_heads=1, hidden=32, intermediate=64,
                                                       vocab=320, max_position=512),
                                      cache_dir=str(tmp_path / "tok"), verbose=False)
        return M.R2ec(model, tok, ds, impl="torch"), [p for p in model.parameters() if p.requires_grad]
    if kind == "gemma2":
        model, tok = backbone.build_backbone(gdir, ds, verbose=False)
        return M.R2ec(model, tok, ds, impl="torch"), [p for p in model.parameters() if p.requires_grad]
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = backbone.train_tokenizer(ds, 320, cache_dir=str(tmp_path / "tok"), verbose=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
        tok.save_pretrained(tmp_path / "llama")
        model, tok = backbone.build_backbone(str(tmp_path / "llama"), ds, verbose=False)
        params = backbone.apply_lora(model, r=2, alpha=4.0)
        with torch.no_grad():
            for p in params[1::2]:
                p.normal_(0, 0.1)                 # B != 0: the A matrices get gradients too
    return M.R2ec(model, tok, ds, impl="torch"), params


@pytest.mark.parametrize("kind", ["tiny", "llama_lora", "gemma2"])
def test_gradient_checkpointing_same_results(kind, gemma_dir, tmp_path, device):
    r, params = make_backbone(kind, gemma_dir, tmp_path)
    r.model.to(device)
    ds, G, T = gemma_dir[0], 2, 1.2
    r.model.eval()
    ro, _ = r.decode(r.split_prompt_ids(ds.train, [1, 3]), G=G, greedy=False, temperature=T, max_new_tokens=5,
                     seed=3)
    assert (ro["attention_mask"][:, :ro["prompt_len"]] == 0).any()   # prompts of different lengths: left padding
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(ro["input_ids"].shape[0], ro["input_ids"].shape[1] - ro["prompt_len"], generator=gen).to(device)

    def step():
        r.model.train()
        logp, h_T, ent = r.forward_both(ro, G, T, return_entropy=True)
        h_v = r.encode_items([3, 4, 5], grad=True)
        loss = (logp * w).sum() + (ent * w).sum() + (h_T @ h_v.T).sum()
        grads = torch.autograd.grad(loss, params)
        r.model.eval()
        return [x.detach() for x in (logp, h_T, ent, h_v)], grads

    base, gbase = step()
    mlp_calls = []
    mlp = r.backbone.layers[0].mlp
    plain_mlp = mlp.forward
    mlp.forward = lambda *a, **k: mlp_calls.append(1) or plain_mlp(*a, **k)   # (hooks skip the recompute)
    rows = []
    plain_rows = r.rows_forward
    r.rows_forward = lambda *a: rows.append(1) or plain_rows(*a)
    assert r.enable_gradient_checkpointing() is r and r.grad_ckpt
    assert any(getattr(m, "gradient_checkpointing", False) for m in r.model.modules())
    ck, gck = step()
    assert len(rows) == 2                           # forward_both and encode_items took the full-row path
    assert len(mlp_calls) == 4                      # each layer ran twice per pass: checkpointing recomputed it
    for a, b in zip(ck, base):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(gck, gbase):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # eval mode keeps the shared-prompt cache (no checkpointing there) and the same numbers
    with torch.no_grad():
        logp, h_T, _ = r.forward_both(ro, G, T)
    assert len(rows) == 2
    torch.testing.assert_close(logp, base[0], atol=1e-5, rtol=1e-5)
