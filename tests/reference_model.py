"""Slow, obvious reference versions of model.py's operations, kept only to test the fast ones against.

model.R2ec.decode (one cached pass, KV cache repeated G times, h_T on the way) is checked against
generate() + forward_full(); R2ec.forward_both (prompt shared by its G chains) against forward_full()
(one plain forward per row); R2ec.encode_items (template prefix shared) against encode_items_plain()
(each item prompt alone, left-padded).
"""
import torch
import torch.nn.functional as F

import model as M
from kernels.logprobs import token_logprobs
import backbone
import common


@torch.no_grad()
def generate(r, prompt_ids, G=1, temperature=1.0, top_k=0, greedy=False, max_new_tokens=640, seed=0):
    """Sample G chains per prompt (batched, left padding, KV cache) until each has written the anchor;
    chains cut off (or ending their turn first) get the anchor appended. -> rollout dict (as decode's)."""
    prompts = [p for p in prompt_ids for _ in range(G)]
    N = len(prompts)
    ids, mask = r.pad_left(prompts)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = backbone.new_cache(r.model)
    h = r.hidden(ids, mask, pos, cache)[:, -1]
    next_pos = pos[:, -1:] + 1
    tail = len(common.ANCHOR) + 2
    u = torch.rand(N, max_new_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    comps, lps = [[] for _ in range(N)], [[] for _ in range(N)]
    done, hit = [False] * N, [False] * N
    for s in range(max_new_tokens):
        tok, lp = M.sample_next(r.logits(h), temperature, greedy, top_k, u[:, s].to(r.device))
        for i, (t, l) in enumerate(zip(tok.tolist(), lp.tolist())):
            if done[i]:
                continue
            if t in r.stop_ids:
                done[i] = True
                continue
            comps[i].append(t)
            lps[i].append(l)
            if common.ANCHOR in r.tok.decode(comps[i][-tail:]):
                done[i] = hit[i] = True
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(N, 1)], 1)
        h = r.hidden(tok[:, None], mask, next_pos, cache)[:, -1]
        next_pos = next_pos + 1
    n_sampled = [len(c) for c in comps]
    comps = [c if hit[i] else c + list(r.anchor_ids) for i, c in enumerate(comps)]
    return r.assemble(prompts, comps, lps, n_sampled, [not x for x in hit])


def no_reasoning(r, prompt_ids, G=1):
    prompts = [p for p in prompt_ids for _ in range(G)]
    return r.assemble(prompts, [list(r.anchor_ids) for _ in prompts], [[]] * len(prompts), [0] * len(prompts),
                      [False] * len(prompts))


def forward_full(r, input_ids, attention_mask, completion_mask, temperature=1.0, return_entropy=False):
    """One plain backbone pass per row set -> (logp [B,L] (0 off the completion), h_T [B,d], entropy)."""
    B, L = input_ids.shape
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hid = r.hidden(input_ids, attention_mask, pos)                                    # [B, L, d]
    h_T = F.normalize(hid[torch.arange(B), M.last_index(attention_mask)].float(), dim=-1)
    m = completion_mask[:, 1:].bool()
    lp, ent = token_logprobs(hid[:, :-1][m], r.lm_weight, input_ids[:, 1:][m], temperature,
                             return_entropy=True, impl="reference")
    full = torch.cat([torch.zeros_like(m[:, :1]), m], 1)
    logp = torch.zeros(B, L, device=hid.device).masked_scatter(full, lp.float())
    ent = torch.zeros(B, L, device=hid.device).masked_scatter(full, ent.float())
    return logp, h_T, (ent if return_entropy else None)


def encode_items_plain(r, ids):
    """Each item prompt on its own row, left-padded, no shared prefix -> h_v [n, d]."""
    x, m = r.pad_left(r.item_prompt_ids(ids))
    return F.normalize(r.hidden(x, m, (m.cumsum(-1) - 1).clamp(min=0))[:, -1].float(), dim=-1)
