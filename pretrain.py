"""Stage 1 of the nano recipe: the LM stage that teaches a from-scratch backbone the data's language
before RecPO (as nanochat's base/mid training comes before its RL). Not in the paper (arXiv 2505.16994
starts RecPO from a pretrained LM, §4); our tiny backbone has read nothing, so it first reads the TRAIN
split, never valid or test. This file owns the stage: its documents, its losses and its loop.

A document is the R²ec user prompt of a train sample (§3.1), then the assistant turn
'<next item text> <answer>': the reasoning the stage teaches names the next item's genres and title. A dataset
with a knowledge corpus (data.Dataset.relation: synthetic-knowledge) instead teaches the turn
'<what the corpus says of the last item> <answer>' on the samples where that does not name the target, and the
corpus itself is read as text every step (corpus_batch sentences).
Its loss, per step:
    next-token NLL (prompt tokens weighted prompt_weight, the turn 1)
  + item_weight x the item head's cross-entropy of h_T (prompt + anchor, no reasoning) against the target,
    over the batch's targets + `negatives` uniform items encoded fresh (or the cached table, full=True)
  + line_weight x the same at the end of every history line of the prompt (target: the next line's item),
    SASRec's every-position supervision, read off the same forward
  + id_weight x next-token NLL of id_batch item-token sequences (history, then target: id_documents), the
    collaborative signal at SASRec's rate, where titles say little (--item-tokens only)
  + next-token NLL of corpus_batch knowledge corpus sentences (at most all of them), when the data has one.

    Stage(...)                       the stage's settings (train.py fills them from its flags)
    lm_documents / lm_loss / stage_forward / item_ce / stage_loss   the documents and losses
    corpus_documents / recall_text / knowledge                      a knowledge corpus and its taught chain
    lm_stage(r, params, split, stage, seconds, log) -> {steps, loss, seconds[, item_loss]}   the loop
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (KNOWLEDGE_FACT, all_gather, all_reduce_grads, autocast, fit_threads, rank_slice,
                    show_progress)
from data import train_indices
from kernels.catalog import catalog_loss
from kernels.logprobs import token_logprobs


@dataclass
class Stage:
    steps: int = 0                # AdamW steps (0 = no stage)
    lr: float = 3e-3              # peak LR: 20 warm-up steps, then cosine to 0.1 x lr
    batch_size: int = 32          # documents per step (all processes together)
    prompt_history: int = 20      # history lines in a document's prompt
    prompt_weight: float = 1.0    # weight of the prompt's tokens in the NLL (the assistant turn: 1)
    item_weight: float = 0.0      # + w x the item loss w/o reasoning
    line_weight: float = 0.0      # + w x the item loss at each history line's end (needs item_weight)
    id_weight: float = 0.0        # + w x next-token NLL of item-token sequences (item tokens only)
    id_batch: int = 128           # their number a step: ~21 tokens each, every one an item prediction
    corpus_batch: int = 512       # knowledge corpus sentences a step, at most all (synthetic-knowledge)
    negatives: int = 128          # uniform items encoded fresh beside the batch's targets
    full: bool = False            # item softmax over the cached table instead (--item-loss full)
    item_refresh: int = 20        # full=True: re-encode the table every N steps
    item_batch_size: int = 256
    seed: int = 0


def next_item_text(r, item_id):
    """What the stage teaches the reasoning to say about the next item: its short description (the genres,
    when the data has them; long descriptions are skipped), then its token (item tokens) and title."""
    it = r.dataset.items[int(item_id)]
    desc = " ".join((it.get("description") or "").split())
    desc = desc + " " if desc and len(desc.split()) <= 12 else ""
    return f"{desc}Next: {r.item_tag(item_id)}{it['title'].strip()}"


RECALL = 1   # a knowledge dataset's taught chain: the facts of the prompt's RECALL newest items


def fact_text(r, a, b):
    """The corpus sentence 'A is followed by B.' as the model reads and writes it (item tokens, titles)."""
    t = r.dataset.items
    return KNOWLEDGE_FACT.format(a=r.item_tag(a) + t[a]["title"], b=r.item_tag(b) + t[b]["title"])


def corpus_documents(r):
    """The knowledge corpus (data.Dataset.relation): one sentence per item that has a fact, as token lists.
    A function of the items only; [] when the data has none."""
    return r.encode_text([fact_text(r, a, b) for a, b in enumerate(r.dataset.relation) if b])


def recalled(rel, hist):
    """The history row's RECALL newest items that have a fact (newest first)."""
    return [int(i) for i in hist[::-1] if i and rel[i]][:RECALL]


def recall_text(r, hist):
    """A knowledge dataset's taught chain for a history row: what the corpus says of its newest item, in the
    corpus's own words ('Your last movie is followed by <B>.'): where B is written, the newest item token is
    the last history line's, as A's is in the corpus sentence, so the recall is the lookup the corpus trained
    (copying A's token first would be a skill a new item's token has never practised). A generic habit, like
    a pretrained LM describing what it knows; it never reads the target."""
    rel, t = r.dataset.relation, r.dataset.items
    last = f"Your last {r.dataset.domain['item']}"
    return " ".join(KNOWLEDGE_FACT.format(a=last, b=r.item_tag(rel[a]) + t[rel[a]]["title"])
                    for a in recalled(rel, hist))


def knowledge(r, split, n_hist=None):
    """-> (the corpus's token lists, the train samples the recall chain is taught on: those whose chain does
    not name their own target, so the stage never writes it; RecPO learns whether the facts predict it).
    No corpus: ([], None), and every sample is taught the next-item turn."""
    rel = r.dataset.relation
    if not rel.any():
        return [], None
    h = slice(-int(n_hist) if n_hist else None, None)
    named = [split.target[j] in rel[recalled(rel, split.hist[j][h])] for j in range(len(split))]
    return corpus_documents(r), np.flatnonzero(~np.array(named, bool))


def lm_documents(r, split, idx, n_hist=None, line_ends=False):
    """Documents of samples idx of a split (the TRAIN split only): the user prompt of the history, then the
    assistant turn '<next item text> <answer>', or with a knowledge corpus '<recall_text> <answer>'.
    -> (token lists, prompt lengths), + the prompts' line ends (R2ec.user_prompt_ids) with line_ends=True."""
    got = r.split_prompt_ids(split, idx, n_hist, line_ends)
    prompts, ends = got if line_ends else (got, None)
    h = slice(-int(n_hist) if n_hist else None, None)
    turn = ((lambda i: recall_text(r, split.hist[i][h])) if r.dataset.relation.any() else
            (lambda i: next_item_text(r, split.target[i])))
    conts = r.encode_text([turn(i) for i in idx])
    docs = [p + c + list(r.anchor_ids) for p, c in zip(prompts, conts)]
    lens = [len(p) for p in prompts]
    return (docs, lens, ends) if line_ends else (docs, lens)


def lm_loss(r, docs, prompt_lens=None, hidden=False, prompt_weight=0.0):
    """Mean next-token NLL of token lists (right-padded; no [N, L, V] logits: the fused log-prob kernel).
    With prompt_lens, the first prompt_lens[i] tokens weigh prompt_weight (0: context only), the rest 1: a
    weighted mean. hidden=True: -> (loss, states [N, L, d])."""
    L, dev = max(len(d) for d in docs), r.device
    ids = torch.full((len(docs), L), r.pad_id, dtype=torch.long)
    weight = torch.zeros(len(docs), L)
    for i, d in enumerate(docs):
        ids[i, :len(d)] = torch.tensor(d)
        weight[i, 1:len(d)] = prompt_weight if prompt_lens else 1.0
        weight[i, (prompt_lens[i] if prompt_lens else 1):len(d)] = 1.0
    ids, weight = ids.to(dev), weight.to(dev)
    lens = torch.tensor([len(d) for d in docs], device=dev)
    am = torch.arange(L, device=dev)[None] < lens[:, None]                              # [N, L]
    pos = torch.arange(L, device=dev)[None].expand(len(docs), L)
    h = r.hidden(ids, am.long(), pos)                                                   # [N, L, d]
    m = weight[:, 1:] > 0
    lp = token_logprobs(h[:, :-1][m], r.lm_weight, ids[:, 1:][m], 1.0, impl=r.impl, softcap=r.softcap)
    w = weight[:, 1:][m]
    nll = -(lp.float() * w).sum() / w.sum()
    return (nll, h) if hidden else nll


def stage_forward(r, docs, prompt_lens, prompt_weight=1.0):
    """lm_loss(docs, prompt_lens, prompt_weight=...) and the w/o-reasoning h_T of the prompts
    (prompt | anchor) from ONE pass over the prompts: they run once, LEFT-padded, and their KV cache
    serves two suffixes each, the turn and the bare anchor (R2ec.prefix_forward). Same math as lm_loss
    plus a forward of prompt + anchor; a stage step ~12 % faster.
    -> (loss, prompt states [N, P, d] LEFT-padded to the longest prompt P, h_T)."""
    pre, pmask = r.pad_left([d[:n] for d, n in zip(docs, prompt_lens)])   # [N, P]
    sufs = [s for d, n in zip(docs, prompt_lens) for s in (d[n:], list(r.anchor_ids))]
    sid, smask = r.pad_right(sufs)                                         # [2N, S]
    _, hs, H = r.prefix_forward(pre, pmask, sid, smask, 2, prefix=True)    # turn, anchor rows
    mp = (pmask[:, :-1] * pmask[:, 1:]).bool() & (prompt_weight > 0)       # prompt token j+1 from j
    mt = smask[0::2].bool()                                                # turn token k from k-1
    pred_t = torch.cat([H[:, -1:], hs[0::2, :-1]], 1)                      # the prompt's last: 0
    rows = torch.cat([H[:, :-1][mp], pred_t[mt]])
    tgt = torch.cat([pre[:, 1:][mp], sid[0::2][mt]])
    lp = token_logprobs(rows, r.lm_weight, tgt, 1.0, impl=r.impl, softcap=r.softcap)
    w = torch.cat([torch.full((int(mp.sum()),), float(prompt_weight)), torch.ones(int(mt.sum()))])
    w = w.to(lp.device)
    last = smask[1::2].sum(1) - 1
    h_T = r.item_head(hs[1::2][torch.arange(len(docs), device=hs.device), last])
    return -(lp.float() * w).sum() / w.sum(), H, h_T


def item_ce(r, prompts, targets, negatives, exclude=None, lines=None, h=None):
    """Supervised item loss (with grad) of each target [B]: h_T of the w/o-reasoning form (prompt, then
    the anchor). The distinct targets + negatives [S] are encoded fresh. exclude=None: softmax
    cross-entropy over those. exclude [B, X] (history ids): over the whole cached table with those masked,
    the fresh rows entering with the table's values and their own gradients (straight-through: no row is
    told apart by being fresher than the others). lines = (states [K, d], their targets [K], exclude
    [K, X] or None, w): + w x the same loss of those rows (their targets are encoded too). h [B, d]: h_T
    already computed (stage_forward), the prompts unused.
    -> (loss, candidate ids, their fresh embeddings, detached)."""
    if h is None:
        ids, mask = r.pad_left([p + list(r.anchor_ids) for p in prompts])
        h = r.item_head(r.hidden(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))[:, -1])
    extra = [lines[1].cpu()] if lines else []
    cand = torch.unique(torch.cat([targets, negatives] + extra))                        # [U] sorted
    e = r.encode_items(cand.tolist(), grad=True).to(h.device)                           # [U, d]
    if exclude is not None:
        E, c = r.table.E.detach(), cand.to(r.table.E.device)
        table = E.index_copy(0, c, E[c] + (e - e.detach()).to(E.dtype))

    def ce(h, t, ex):
        if ex is None:
            return F.cross_entropy(h @ e.T / r.tau, torch.searchsorted(cand, t.cpu()).to(h.device))
        t, ex = t.to(E.device), ex.to(E.device)
        return catalog_loss(h.to(E.dtype), table, t, ex, tau=r.tau, impl=r.impl)
    loss = ce(h, targets, exclude)
    if lines is not None and len(lines[1]):
        loss = loss + lines[3] * ce(r.item_head(lines[0]), lines[1], lines[2])
    return loss, cand, e.detach()


def id_documents(r, split, idx):
    """Item-token sequences of samples idx: the history's item tokens, then the target's. Every token of one
    is an item prediction over the whole vocabulary (SASRec's every-position objective, through the LM head),
    for a tenth of a text document's tokens."""
    tok = r.item_token_ids()
    return [[tok[i] for i in split.hist[j] if i] + [tok[split.target[j]]] for j in idx]


def stage_loss(r, split, st, s, corpus=None):
    """The stage's loss on its step-s batch of `split` (the TRAIN split); under torchrun this process's
    share. corpus: knowledge(r, split, st.prompt_history), computed once by the caller (None: here).
    -> (loss, lm loss, item loss or None)."""
    B, n_items = st.batch_size, r.dataset.num_items
    id_nll = 0.0   # + the item-token sequences' NLL
    if st.id_weight and r.item_tokens:
        j = train_indices(s, st.id_batch, len(split), st.seed + 104729)[rank_slice(st.id_batch)]
        id_nll = st.id_weight * lm_loss(r, id_documents(r, split, j))
    corpus = corpus or knowledge(r, split, st.prompt_history)
    if corpus[0] and st.corpus_batch:   # the knowledge corpus, read as pretraining text
        n = min(st.corpus_batch, len(corpus[0]))
        j = train_indices(s, n, len(corpus[0]), st.seed + 15485863)[rank_slice(n)]
        id_nll = id_nll + lm_loss(r, [corpus[0][k] for k in j])
    w_line = st.line_weight if st.item_weight else 0.0
    pool = np.arange(len(split)) if corpus[1] is None else corpus[1]
    idx = pool[train_indices(s, B, len(pool), st.seed + 7919)[rank_slice(B)]]
    # ends: [] | [e]
    docs, plen, *ends = lm_documents(r, split, idx, st.prompt_history, line_ends=bool(w_line))
    if not st.item_weight:
        lm = lm_loss(r, docs, plen, prompt_weight=st.prompt_weight)
        return lm + id_nll, lm, None
    # the w/o-reasoning h_T from the same pass (the prompt once, then the turn and the bare anchor)
    lm, h, h_T = stage_forward(r, docs, plen, st.prompt_weight)
    off = h.shape[1] - torch.as_tensor(plen)                                            # left-padded prompts
    rng = np.random.default_rng([st.seed, 7919, s])
    neg = rng.choice(n_items, min(st.negatives, n_items), replace=False)
    hist, lines = torch.from_numpy(split.hist[idx]), None
    # (sample, token, next)
    rows = [(b, j, t) for b, e in enumerate(ends[0]) for j, t in e] if w_line else []
    if rows:
        b, j, t = torch.tensor(list(zip(*rows)), dtype=torch.long)
        at = (b.to(h.device), (j + off[b]).to(h.device))
        lines = (h[at], t, hist[b] if st.full else None, w_line)
    prompts = [d[:n] for d, n in zip(docs, plen)]
    targets = torch.as_tensor(split.target[idx])
    exclude = hist if st.full else None
    item, ids, emb = item_ce(r, prompts, targets, torch.from_numpy(neg + 1), exclude, lines, h_T)
    if st.full:
        r.table.update(all_gather(ids.to(emb.device)), all_gather(emb))   # the next steps see the new values
    return lm + id_nll + st.item_weight * item, lm, item


def lm_stage(r, params, split, st, seconds=0.0, log=None):
    """st.steps AdamW steps of stage_loss, linear warm-up (20 steps) then cosine to 0.1 x st.lr over the
    steps the stage will run (sized after 10 steps when `seconds` caps it); stops after `seconds` (0 = no
    cap). Under torchrun each process takes its share of the batch; gradients are summed.
    -> {steps, loss (mean of the last 20 steps), seconds[, item_loss]}."""
    opt = torch.optim.AdamW(params, lr=st.lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    corpus = knowledge(r, split, st.prompt_history)
    losses, item_losses = [], []
    horizon = st.steps
    bar = tqdm(total=st.steps, desc="LM stage", disable=not show_progress(), unit="step")
    r.model.train()
    for s in range(st.steps):
        fit_threads(r.device)
        el = time.time() - t0
        if seconds and el > seconds:
            break
        if seconds and s == 10:   # the cosine ends where the time cap will stop the stage
            horizon = min(st.steps, int(seconds / (el / s)))
        t = min(1.0, s / max(1, horizon))
        for g in opt.param_groups:
            g["lr"] = st.lr * min(1.0, (s + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))
        if st.full and st.item_weight and s % st.item_refresh == 0:
            r.refresh_items(st.item_batch_size)
        with autocast(r.device):
            loss, lm, item = stage_loss(r, split, st, s, corpus)
        loss.backward()
        all_reduce_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(lm.item())
        item_losses += [] if item is None else [item.item()]
        bar.update(1)
        shown = {"loss": f"{losses[-1]:.3f}"}
        if item_losses:
            shown["item"] = f"{item_losses[-1]:.3f}"
        bar.set_postfix(**shown)
        if log and (s + 1) % 50 == 0:
            rec = {"lm_step": s + 1, "lm_loss": float(np.mean(losses[-50:])),
                   "learning_rate": opt.param_groups[0]["lr"]}
            if item_losses:
                rec["lm_item_loss"] = float(np.mean(item_losses[-50:]))
            log(rec)
    bar.close()
    out = {"steps": len(losses), "loss": float(np.mean(losses[-20:])) if losses else float("nan"),
           "seconds": time.time() - t0}
    if item_losses:
        out["item_loss"] = float(np.mean(item_losses[-20:]))
    return out
