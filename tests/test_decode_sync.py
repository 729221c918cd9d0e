"""R2ec.decode keeps tokens, log-probs and stop flags on the device: no host transfer per generated token.

- test_no_host_transfer_per_token: every call that moves data between host and device (or makes the host wait
  for the device), made from model.py's own code while decode() runs, is counted; the count grows by at most 2
  per DECODE_BLOCK tokens (the block's token copy, the rows that wrote the anchor), not 3 per token as before.
- test_same_as_the_per_token_decode: decode() returns exactly (torch.equal: tokens, log-probs, masks, lengths,
  cut, h_T) what the per-token decode it replaced (old_decode below, its code unchanged) returns, on tiny
  random models of irregular sizes (Qwen2; Gemma-2 with sliding windows), greedy and sampled, G > 1,
  greedy_first, max_new_tokens=0 and cutting rows, end-of-turn tokens, the anchor written mid-block, decodes
  ending mid-block, batches with and without padding, with and without the shared template prefix.
CPU only: a CUDA-shaped count (calls that would sync there); bitwise equality is asked of CPU kernels only.
"""
import os
import sys

import numpy as np
import pytest
import torch

import backbone
import model as M
from common import ANCHOR
from test_model import TINY, fake_dataset

MODEL_PY = os.path.realpath(M.__file__)


# ---------------------------------------------------------------- the per-token decode it replaced

@torch.no_grad()
def old_decode(self, prompts, G=1, greedy=True, temperature=1.0, top_k=0, max_new_tokens=640, seed=0, first=0,
               greedy_first=False):
    """model.R2ec.decode as of commit 29c2d43 (one host round trip per token), self = an R2ec."""
    room = 0 if torch.is_grad_enabled() else max_new_tokens + len(self.anchor_ids)
    cache, pre = backbone.new_cache(self.model, room), self.user_prefix()
    k = len(pre) if pre and all(len(p) > len(pre) and p[:len(pre)] == pre for p in prompts) else 0
    if k:
        one = torch.ones(1, k, dtype=torch.long, device=self.device)
        pos0 = torch.arange(k, device=self.device)[None]
        self.hidden(torch.tensor([pre], device=self.device), one, pos0, cache)
        cache.batch_repeat_interleave(len(prompts))
    ids, mask = self.pad_left([p[k:] for p in prompts])
    pos = k + (mask.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([mask.new_ones(len(prompts), k), mask], 1)
    h = self.hidden(ids, mask, pos, cache)[:, -1]
    if G > 1:
        cache.batch_repeat_interleave(G)
        h = h.repeat_interleave(G, 0)
        mask = mask.repeat_interleave(G, 0)
        pos = pos.repeat_interleave(G, 0)
    N, dev = h.shape[0], h.device
    next_pos = pos[:, -1] + 1
    h_T = torch.zeros(N, h.shape[1], device=dev)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    noise = None
    if not greedy:
        rngs = [np.random.default_rng(seeds + [first + i // G, i % G]) for i in range(N)]
        noise = torch.from_numpy(np.stack([g.random(max_new_tokens) for g in rngs])).to(dev)
    if greedy_first and noise is not None:
        noise[::G] = -1.0
    closes, tail = self._closes_anchor(), len(ANCHOR) + 2
    comps, lps = [[] for _ in range(N)], [[] for _ in range(N)]
    done, hit = [False] * N, [False] * N

    def feed(tok, fed):
        nonlocal mask, next_pos
        mask = torch.cat([mask, fed.long()[:, None]], 1)
        out = self.hidden(tok[:, None], mask, next_pos[:, None], cache)[:, -1]
        next_pos = next_pos + fed.long()
        return out

    for s in range(max_new_tokens):
        if all(done):
            break
        tok, lp = M.sample_next(self.logits(h), temperature, greedy, top_k, None if greedy else noise[:, s])
        fed, closed = [False] * N, []
        for i, (t, l) in enumerate(zip(tok.tolist(), lp.tolist())):
            if done[i]:
                continue
            if t in self.stop_ids:
                done[i] = True
                continue
            comps[i].append(t)
            lps[i].append(l)
            fed[i] = True
            if closes[t] and ANCHOR in self.tok.decode(comps[i][-tail:]):
                done[i] = hit[i] = True
                closed.append(i)
        h = feed(tok, torch.tensor(fed, device=dev))
        if closed:
            h_T[closed] = h[closed].float()
    n_sampled = [len(c) for c in comps]
    need = torch.tensor([not x for x in hit], device=dev)
    if need.any():
        for a in self.anchor_ids:
            h = feed(torch.full((N,), a, dtype=torch.long, device=dev), need)
        h_T[need] = h[need].float()
    comps = [c if hit[i] else c + list(self.anchor_ids) for i, c in enumerate(comps)]
    chain_prompts = [p for p in prompts for _ in range(G)]
    ro = self.assemble(chain_prompts, comps, lps, n_sampled, [not x for x in hit])
    return ro, self.item_head(h_T)


# ---------------------------------------------------------------- counting host transfers

class HostTransfers:
    """Counts, while active, the calls made from model.py's own code that move data between host and device or
    make the host wait for the device on CUDA: reading a tensor (tolist, item, cpu, numpy, bool / int / float
    / index conversion), building one on a device (torch.tensor / as_tensor with a device), .to(a device), and
    indexing with a bool tensor (its size needs a sync) or with a Python list (a host-to-device copy)."""
    READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")

    def __init__(self):
        self.n, self.saved, self.where = 0, [], {}

    def _count(self, what):
        f = sys._getframe(2)
        if os.path.realpath(f.f_code.co_filename) == MODEL_PY:
            self.n += 1
            self.where[(what, f.f_lineno)] = self.where.get((what, f.f_lineno), 0) + 1

    def _patch(self, owner, name, counts):
        orig = getattr(owner, name)
        self.saved.append((owner, name, owner.__dict__.get(name)))

        def wrapper(*a, **kw):
            if counts(*a, **kw):
                self._count(name)
            return orig(*a, **kw)
        setattr(owner, name, wrapper)

    def __enter__(self):
        T = torch.Tensor
        for name in self.READS:
            self._patch(T, name, lambda *a, **kw: True)
        to_device = lambda x, *a, **kw: "device" in kw or bool(a) and isinstance(a[0], (str, torch.device))
        self._patch(T, "to", to_device)
        for name in ("tensor", "as_tensor"):
            self._patch(torch, name, lambda *a, **kw: kw.get("device") is not None)

        def host_index(x, i, *v):
            ii = i if isinstance(i, tuple) else (i,)
            return any(isinstance(j, list) or torch.is_tensor(j) and j.dtype == torch.bool for j in ii)
        self._patch(T, "__getitem__", host_index)
        self._patch(T, "__setitem__", host_index)
        return self

    def __exit__(self, *exc):
        for owner, name, own in reversed(self.saved):   # the class's own attribute back, or none
            setattr(owner, name, own) if own is not None else delattr(owner, name)


# ---------------------------------------------------------------- models

IRREGULAR = [dict(TINY, layers=3, heads=3, kv_heads=1, hidden=48, intermediate=70, seed=5),
             dict(TINY, layers=1, heads=5, kv_heads=5, hidden=40, intermediate=33, seed=11)]
GEMMA_WINDOWS = (512, 40)   # sliding windows: never full here (blocks); full from the prompt on (1-token)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two Qwen2 of irregular sizes, then two Gemma-2 (sliding-window layers, both soft-caps)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    ds = fake_dataset()
    cache = str(tmp_path_factory.mktemp("tokcache"))
    out = []
    for cfg in IRREGULAR:
        hf, tok = backbone.build_backbone("tiny", ds, cfg, cache_dir=cache, verbose=False)
        out.append(M.R2ec(hf, tok, ds, impl="torch"))
    for w in GEMMA_WINDOWS:
        cfg = Gemma2Config(vocab_size=len(tok), hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=3, num_key_value_heads=1, head_dim=8,
                           max_position_embeddings=512,
                           sliding_window=w, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                           bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(w)
            hf = Gemma2ForCausalLM(cfg).eval()
        out.append(M.R2ec(hf, tok, ds, impl="torch"))
    return out


def steer(r, strength, seed=0):
    """LM head + a bias that depends on each row's hidden state only (and on the token and position fed to get
    it, looked up by its bytes: decode() may go back steps). After '<' comes 'answer', then '>' or '>.' (the
    anchor, alone or in '<answer>.'); elsewhere '<' and the end-of-turn token get a bias of about `strength`
    that waxes and wanes with the position: chains end their turn, write the anchor mid-block, or run on."""
    V, d = r.lm_weight.shape
    one = lambda t: r.tok.convert_tokens_to_ids(t)
    lt, ans, gt, gtdot = one("<"), one("answer"), one(">"), one(">.")
    eot = sorted(r.stop_ids)[0]
    R = torch.randn(d, 4, generator=torch.Generator().manual_seed(seed)).to(r.device) / d ** 0.5
    table = torch.zeros(V + 1, V, device=r.device)   # [previous token (V: unknown), V] bias
    table[lt, ans] = 40.0
    table[ans, [gt, gtdot]] = 40.0
    base, prev = M.R2ec.logits.__get__(r), {}   # prev: hidden state's bytes -> (token, position) that gave it

    def record(m, args, kw, out):
        for x, t, p in zip(out.last_hidden_state[:, -1].detach().cpu(), kw["input_ids"][:, -1].tolist(),
                           kw["position_ids"][:, -1].tolist()):
            prev[x.numpy().tobytes()] = (t, p)
    hook = r.backbone.register_forward_hook(record, with_kwargs=True)

    def logits(h):
        z = base(h)                                                               # [N, V]
        t, p = torch.tensor([prev.get(x.numpy().tobytes(), (V, 0)) for x in h.detach().cpu()],
                            device=h.device).T                                    # [N] each
        u = torch.tanh(h.float() @ R)                                             # [N, 4]
        z = z + table[t]
        z[:, [gt, gtdot]] += u[:, :2]
        z[:, lt] += strength + 3 * torch.sin(0.7 * p + 3 * u[:, 2])
        z[:, eot] += strength - 2 + 3 * torch.sin(0.45 * p + 3 * u[:, 3])
        return z
    r.logits = logits
    return hook


def unsteer(r, hook):
    r.__dict__.pop("logits", None)
    hook is not None and hook.remove()


CASES = [dict(G=1, greedy=True, max_new_tokens=0),
         dict(G=1, greedy=True, max_new_tokens=1),
         dict(G=1, greedy=True, max_new_tokens=23),
         dict(G=3, greedy=False, temperature=1.3, top_k=0, max_new_tokens=16, seed=4),
         dict(G=3, greedy=False, temperature=0.9, top_k=7, max_new_tokens=37, seed=(2, 9), greedy_first=True),
         dict(G=2, greedy=False, temperature=2.0, top_k=50, max_new_tokens=5, seed=1, first=3),
         dict(G=4, greedy=False, temperature=1.0, top_k=0, max_new_tokens=64, seed=7, greedy_first=True)]


def assert_same(got, want):
    (a, ha), (b, hb) = got, want
    assert a.keys() == b.keys() and a["prompt_len"] == b["prompt_len"]
    for k in a:
        if k != "prompt_len":
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert ha.dtype == hb.dtype and torch.equal(ha, hb), "h_T"


@pytest.mark.parametrize("strength", [None, 2.0, 4.0])
@pytest.mark.parametrize("m", [0, 1, 2, 3])
def test_same_as_the_per_token_decode(models, m, strength, monkeypatch):
    r = models[m]
    ds = r.dataset
    user = r.split_prompt_ids(ds.valid, [0, 3, 5, 8, 10])                # the template prefix shared
    other = [r.item_prompt_ids([7])[0][3:], r.item_prompt_ids([2])[0], r.encode_text(["red star"])[0]]
    seen = {"hit": 0, "eot": 0, "cut": 0, "early": 0, "crop": 0}
    cls = type(backbone.new_cache(r.model))
    crop = cls.crop

    def counted(cache, n):   # decode() going back steps
        seen["crop"] += 1
        return crop(cache, n)
    monkeypatch.setattr(cls, "crop", counted)
    hook = steer(r, strength, seed=m) if strength is not None else None
    try:
        for prompts in (user, other, user[1:2]):   # user[1:2]: no padding (its mask all 1 until a row ends)
            for kw in CASES:
                got, want = r.decode(prompts, **kw), old_decode(r, prompts, **kw)
                assert_same(got, want)
                ro, M_ = got[0], kw["max_new_tokens"]
                n = ro["sampled_mask"].sum(1)
                seen["hit"] += int((~ro["cut"] & (n % M.DECODE_BLOCK > 0)).sum())   # anchor mid-block
                seen["cut"] += int((n == M_).sum()) if M_ else 0
                seen["eot"] += int((ro["cut"] & (n < M_)).sum())
                seen["early"] += int(M_ > 0 and int(n.max()) < M_ and int(n.max()) % M.DECODE_BLOCK > 0)
    finally:
        unsteer(r, hook)
    if strength is not None:   # the steered runs cover every way a row ends, and decodes ending mid-block
        assert min(seen[k] for k in ("hit", "eot", "cut", "early")) > 0, seen
    if m == 3:   # a full sliding window: 1-token blocks, decode() never goes back
        assert seen["crop"] == 0, seen
    elif strength is not None:   # it went back: to a row's anchor (no padding) or to where all rows ended
        assert seen["crop"] > 0, seen


def test_no_host_transfer_per_token(models):
    r = models[0]
    prompts = r.split_prompt_ids(r.dataset.valid, [1, 2, 4, 6])
    kw = dict(G=2, greedy=False, temperature=1.0, seed=3, greedy_first=True)
    counts = {}
    for n in (48, 96):
        with HostTransfers() as c:
            ro, _ = r.decode(prompts, max_new_tokens=n, **kw)
        assert int(ro["sampled_mask"].sum(1).max()) == n   # some row ran all n steps: the loop did too
        counts[n] = c
    per_block = 2   # the block's token copy; the rows that wrote the anchor in it (when some did)
    grow = counts[96].n - counts[48].n
    assert grow <= per_block * 48 // M.DECODE_BLOCK, (grow, counts[96].where)
    assert counts[48].n <= per_block * 48 // M.DECODE_BLOCK + 16, (counts[48].n, counts[48].where)


@pytest.mark.parametrize("penalty", [1.3, 0.7, 20.0])
def test_repetition_penalty_matches_transformers_generate(models, penalty, monkeypatch):
    """The backbone's generation_config.repetition_penalty: greedy chains are transformers' own greedy generate
    with that penalty (prompt tokens count as seen); the log-probs stay the unpenalised ones (forward_both's)."""
    r = models[1]
    monkeypatch.setattr(r, "repetition_penalty", penalty)
    for prompt in r.split_prompt_ids(r.dataset.valid, [2, 7]):
        ro, _ = r.decode([prompt], G=1, greedy=True, max_new_tokens=30)
        n = int(ro["sampled_mask"].sum())
        P = ro["prompt_len"]
        ours = ro["input_ids"][0, P:P + n].tolist()
        ids = torch.tensor([prompt])
        ref = r.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30,
                               repetition_penalty=penalty, pad_token_id=r.pad_id, eos_token_id=sorted(r.stop_ids))
        theirs = [t for t in ref[0, len(prompt):].tolist() if t not in r.stop_ids]
        assert ours == theirs[:n] and (n == len(theirs) or n == 30 or M.ANCHOR in r.tok.decode(ours))
        logp, _, _ = r.forward_both(ro, 1, 1.0)
        m = ro["sampled_mask"][:, P:]
        assert torch.allclose(ro["old_logp"][:, P:][m], logp[m[:, :logp.shape[1]]], atol=1e-4)
    if penalty > 10:   # strong enough to change this untrained model's chain (it repeats one token)
        monkeypatch.setattr(r, "repetition_penalty", 1.0)
        plain, _ = r.decode([prompt], G=1, greedy=True, max_new_tokens=30)
        assert not torch.equal(plain["input_ids"], ro["input_ids"])


@pytest.mark.parametrize("m", [0, 2])
def test_repetition_penalty_blocks_equal_one_token_blocks(models, m, monkeypatch):
    """With the penalty on, decoding in blocks (going back steps included: their tokens are unseen again) gives
    what one-token blocks give."""
    r = models[m]
    monkeypatch.setattr(r, "repetition_penalty", 1.4)
    user = r.split_prompt_ids(r.dataset.valid, [0, 3, 5, 8, 10])
    hook = steer(r, 4.0, seed=m)
    try:
        for prompts in (user, user[1:2]):
            for kw in CASES[2:]:
                got = r.decode(prompts, **kw)
                monkeypatch.setattr(M, "DECODE_BLOCK", 1)
                want = r.decode(prompts, **kw)
                monkeypatch.setattr(M, "DECODE_BLOCK", 16)
                assert_same(got, want)
    finally:
        unsteer(r, hook)
