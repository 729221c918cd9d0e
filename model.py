"""The dual-head R²ec model (arXiv 2505.16994, §3.1): one causal LM, two heads, no new parameters.

- LM head: the backbone's own token head writes the reasoning.
- Item head (R2ec.item_head: the one place that turns a hidden state into the vector the catalog scores):
  h = final-layer hidden state (after the final norm) at the LAST token, L2-normalised.
  Items: h_v at the end of the item prompt (assistant turn pre-filled with the anchor "<answer>").
  Users: h_T at the end of [user prompt + reasoning + anchor]. The scorers' score: s(v) = cos(h_T, h_v) / tau.

This file owns the R2ec class (every operation of the two heads, once each) and its helpers:

    R2ec(model, tokenizer, dataset=None, tau=0.02, max_prompt_len=None, impl="auto")
      prompts   .user_prompt_ids(hist, hist_rating, hist_time, target_time) / .split_prompt_ids(split, idx,
                n_hist) / .item_prompt_ids(ids) -> token id lists (chat template applied)
      reasoning .decode(prompts, G, greedy, temperature, top_k, max_new_tokens, seed, first) -> (rollout,
                h_T): G chains per prompt and their h_T in ONE cached pass (max_new_tokens=0: no reasoning);
                a chain's sampling noise is a function of (seed, its prompt's position first + b, g) only
      one pass  .forward_both(rollout, G, temperature, return_entropy) -> (logp [N,C], h_T [N,d], ent):
                both heads with gradient, each prompt encoded once for its G chains
      items     .encode_items(ids, grad) -> h_v [n,d]; .refresh_items() re-encodes .table.E [N+1,d]
      users     .encode_users(prompts, max_new_tokens, batch_size) -> (h_T [n,d], timings) (greedy)
      low level .hidden(ids, mask, pos, cache) / .logits(h) / .pad_left(seqs) / .prefix_forward(...)
      memory    .enable_gradient_checkpointing(): HF activation checkpointing, full rows, no shared cache
    ItemTable, sample_next, slice_rollout, last_index

Choices worth knowing: generation samples from logits computed as hidden . W^T (the same function the one-pass
uses). Gemma-2's final logit soft-capping (config.final_logit_softcapping = c) is applied, consistently in
both: logits c tanh(hidden . W^T / c), before the temperature (R2ec.softcap, passed to token_logprobs).
Gradient checkpointing swaps the shared-prompt KV cache of forward_both / encode_items for one cache-free
forward over full rows, the prompt repeated. A sequence that emits an end-of-turn token before the anchor is
treated like a cut-off one: the EOS is dropped and the anchor appended.
Backbones: backbone.py; checkpoints: checkpoint.py; the LM stage: pretrain.py."""
import inspect
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from backbone import new_cache
from common import (ANCHOR, ITEM_TOKEN, ModelError, all_reduce, autocast, fit_threads, format_dt, rank,
                    user_instruction, warn_once, world)
from kernels.logprobs import token_logprobs


def history_line(dt, title, rating, tag=""):
    return f"{format_dt(dt)} ago: {tag}[{title}] ({float(rating):.1f})"


def item_text(item, domain, item_id=None, tag=""):
    """The item prompt's user turn; lines with no data are omitted, description cut to 100 words."""
    title = (item.get("title") or "").strip()
    if not title:
        raise ModelError(f"item {item_id} (raw id {item.get('raw_id')!r}) has an empty title: "
                         "every item needs a title to be encoded; fix or drop it in the item file")
    lines = [f"Title: {tag}{title}"]
    if item.get("average_rating") is not None:
        lines.append(f"User Rating: {float(item['average_rating']):.1f}")
    if item.get("rating_number") is not None:
        lines.append(f"Number of Buyers: {int(item['rating_number'])}")
    desc = " ".join((item.get("description") or "").split()[:100])
    if desc:
        lines.append(f"Description: {desc}")
    return (f"Summarize key attributes of the following {domain['item']} inside <answer> and "
            f"</answer>.\n\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------------
# decode() finds the anchor (text: any tokenisation counts) by decoding on the host, from one copy of every
# DECODE_BLOCK tokens, not once per token (a GPU would wait for Python at each step). A row that wrote it
# mid-block is fed on to the block's end (rows never see each other's tokens) and those tokens are dropped.
DECODE_BLOCK = 16


def last_index(mask):
    """Index of the last real token per row; right for left AND right padding. mask [B,L] -> [B]."""
    L = mask.shape[1]
    return L - 1 - mask.long().flip(-1).argmax(-1)


class ItemTable:
    """E [N+1, d] fp32: row j = h_v of item j, row 0 = zeros (padding, always excluded)."""

    def __init__(self, num_items, dim, device="cpu"):
        self.E = torch.zeros(num_items + 1, dim, device=device)
        self.fresh = False   # True once fully encoded

    def update(self, ids, vecs):
        """Rows ids [n] <- vecs [n, d]; a repeated id takes its LAST row (plain indexing leaves that open)."""
        ids = torch.as_tensor(ids, device=self.E.device).long()
        pos = torch.arange(len(ids), device=ids.device)
        last = torch.full((self.E.shape[0],), -1, device=ids.device).scatter_reduce(0, ids, pos, "amax")
        keep = last[ids] == pos
        self.E[ids[keep]] = vecs.detach()[keep].float().to(self.E.device)


def sample_next(logits, temperature=1.0, greedy=False, top_k=0, u=None, seen=None, penalty=1.0):
    """One decoding step: logits [N, V] fp32 -> (token [N], its log-prob [N]). The log-prob is taken
    under the full tempered softmax (no top-k truncation, no penalty), which is what forward_both recomputes.
    seen [N, V] > 0: tokens already in the row, whose logits the repetition penalty pulls to 0 (CTRL's; as HF
    generate and vLLM apply the backbone's generation_config.repetition_penalty) before the choice.
    Sampling inverts the CDF of softmax(z / T) (over the top k) at u [N] in [0, 1): the caller owns the
    noise, so a row's token depends on its own logits and uniform only, never on the rest of the batch; a row
    whose u is negative takes the argmax (decode(greedy_first=True))."""
    # a NaN model must not crash the run (update() then skips its steps and stops it): NaN -> uniform
    z = torch.nan_to_num(logits / max(temperature, 1e-6), nan=0.0)   # [N, V]
    logp_all = torch.log_softmax(z, -1)
    if seen is not None and penalty != 1.0:
        z = torch.where(seen > 0, torch.where(z > 0, z / penalty, z * penalty), z)
    if greedy:
        tok = z.argmax(-1)
    else:
        top = z.topk(top_k, -1) if top_k and top_k < z.shape[-1] else None   # [N, k] largest first
        cdf = (z if top is None else top.values).double().softmax(-1).cumsum(-1)   # [N, k|V] fp64: no drift
        j = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[1] - 1)
        tok = (j if top is None else top.indices.gather(1, j)).squeeze(1)
        tok = torch.where(u < 0, z.argmax(-1), tok)
    return tok, logp_all.gather(1, tok[:, None]).squeeze(1)


def slice_rollout(ro, rows):
    """Rows of a rollout dict, without the columns that are padding in every one of them."""
    am = ro["attention_mask"][rows]
    cols = am.any(0).nonzero().squeeze(1)
    c = slice(int(cols[0]), int(cols[-1]) + 1)
    out = {k: ro[k][rows][:, c] for k in ("input_ids", "attention_mask", "completion_mask", "sampled_mask",
                                          "old_logp")}
    out["rows"], out["prompt_len"] = rows, ro["prompt_len"] - int(cols[0])
    return out


class R2ec:
    """The backbone with its two heads, the item table, and every model operation (once, the fast way)."""

    def __init__(self, model, tokenizer, dataset=None, tau=0.02, max_prompt_len=None, impl="auto"):
        self.model, self.tok, self.dataset, self.tau, self.impl = model, tokenizer, dataset, tau, impl
        self.backbone = model.base_model   # decoder without the LM head: hidden states only
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ctx = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_prompt_len = max_prompt_len or min(1024, max(ctx - 656, ctx // 2))   # room: 640 new tokens
        self.anchor_ids = tokenizer(ANCHOR, add_special_tokens=False)["input_ids"]
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.stop_ids = {int(e) for e in eos if e is not None}
        params = inspect.signature(self.backbone.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"   # renamed in transformers 5.2x
        self._item_ids = {}
        self._closes = self._item_prefix = self._user_prefix = self._item_tok = None   # built on first use
        self.item_map = None   # [(raw_id, title)] for ids 1..N when loaded from a checkpoint
        self.table = ItemTable(dataset.num_items, model.config.hidden_size, self.device) if dataset else None
        # Gemma-2 final-logit soft-capping: logits c tanh(h.W / c), in .logits and every token_logprobs call
        self.softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
        self.grad_ckpt = False   # set by enable_gradient_checkpointing()
        # a tokenizer with one token per item (train_tokenizer(item_tokens=True)): prompts name items by it
        self.item_tokens = ITEM_TOKEN.format(1) in tokenizer.get_vocab()
        gc = getattr(model, "generation_config", None)   # the backbone's own decoding penalty, as RRec's vLLM
        self.repetition_penalty = float(getattr(gc, "repetition_penalty", None) or 1.0)

    def enable_gradient_checkpointing(self):
        """HF activation checkpointing of every decoder layer (non-reentrant), for backbones whose activations
        do not fit. Checkpointed layers drop any KV cache in training mode, so from then on forward_both and
        encode_items (through prefix_forward) run full rows [prompt | completion] in one cache-free pass while
        the model is in training mode; same results (to fp32 rounding), the prompt is recomputed per row.
        Decoding must run in eval mode (train.py does). -> self."""
        m, kw = self.model, {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):   # newer transformers; the old name warns there
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        emb = m.get_input_embeddings()
        frozen = emb is not None and not emb.weight.requires_grad   # LoRA (frozen embeddings)
        if frozen and getattr(m, "_require_grads_hook", None) is None:
            m.enable_input_require_grads()   # checkpointed layers get an input with grad
        self.grad_ckpt = True
        return self

    @property
    def device(self):
        return self.lm_weight.device

    @property
    def lm_weight(self):
        return self.model.get_output_embeddings().weight   # [V, d]; tied to the input embeddings

    def hidden(self, ids, mask, pos, cache=None):
        """Final-layer hidden states (after the final norm) [B, L, d]; extends `cache` when given."""
        kw = {self._cache_kw: cache, "use_cache": True} if cache is not None else {"use_cache": False}
        return self.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).last_hidden_state

    def logits(self, h):
        """LM head: h [N, d] -> fp32 logits [N, V]; the same function forward_both's log-probs use
        (soft-capped, c tanh(z / c), when self.softcap = c > 0)."""
        z = F.linear(h, self.lm_weight).float()
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z

    def pad_left(self, seqs, right=False):
        """Token lists -> (ids, mask) [B, P] LEFT-padded (right=True: RIGHT-padded) on the model's device."""
        P = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), P, dtype=torch.long)
        for i, s in enumerate(seqs):
            at = slice(0, len(s)) if right else slice(P - len(s), P)
            ids[i, at], mask[i, at] = torch.tensor(s, dtype=torch.long), 1
        return ids.to(self.device), mask.to(self.device)

    def pad_right(self, seqs):
        return self.pad_left(seqs, right=True)

    def chat(self, user_text):
        return self.tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                            add_generation_prompt=True)

    def item_token_ids(self):
        """[N + 1] token id of each item's token (item tokens only; 0: padding)."""
        if self._item_tok is None:
            names = [ITEM_TOKEN.format(i) for i in range(1, self.dataset.num_items + 1)]
            self._item_tok = [0] + self.tok.convert_tokens_to_ids(names)
        return self._item_tok

    def item_tag(self, i):
        """The item's token and a space before its title when the tokenizer has item tokens, else ''."""
        return ITEM_TOKEN.format(int(i)) + " " if self.item_tokens else ""

    def encode_text(self, texts):
        return self.tok(texts, add_special_tokens=False)["input_ids"]   # templates carry their own BOS

    # ---- prompts ----
    def item_prompt_ids(self, ids):
        todo = [int(i) for i in ids if int(i) not in self._item_ids]
        if todo:
            if self.dataset is None:
                raise ModelError("encoding items needs the dataset (item text); pass dataset=")
            d = self.dataset
            texts = [self.chat(item_text(d.items[i], d.domain, i, self.item_tag(i))) + ANCHOR for i in todo]
            for i, t in zip(todo, self.encode_text(texts)):
                self._item_ids[i] = t
        return [self._item_ids[int(i)] for i in ids]

    def user_prompt_ids(self, hist, hist_rating, hist_time, target_time, line_ends=False):
        """Token ids of the chat-rendered user prompts; drops the OLDEST history lines of prompts longer
        than max_prompt_len (the instruction is never cut; the anchor comes after). line_ends=True: also,
        per prompt, [(index of the token holding the newline after line k, item of line k + 1)] for every
        line but the last: the positions where the history itself says what comes next."""
        d, titles = self.dataset.domain, self.dataset.titles
        head = user_instruction(d)
        out, ends, n_trunc, n_lines = [], [], 0, 0
        for b in range(len(hist)):
            lines = [history_line(target_time[b] - t, titles[int(i)], r, self.item_tag(i))
                     for i, r, t in zip(hist[b], hist_rating[b], hist_time[b]) if int(i) != 0]
            ids = self.encode_text(self.chat(head + "\n".join(lines)))
            dropped = 0
            while len(ids) > self.max_prompt_len:
                if not lines:
                    raise ModelError(f"the instruction alone ({len(ids)} tokens) exceeds the max prompt "
                                     f"length {self.max_prompt_len}; raise --max-prompt-len")
                lines, dropped = lines[1:], dropped + 1
                ids = self.encode_text(self.chat(head + "\n".join(lines)))
            n_trunc, n_lines = n_trunc + (dropped > 0), n_lines + dropped
            out.append(ids)
            if line_ends:
                items = [int(i) for i in hist[b] if int(i) != 0][dropped:]
                ends.append(list(zip(self._line_ends(head, lines, ids), items[1:])))
        if n_trunc:
            msg = (f"{n_trunc} of {len(hist)} user prompts exceed {self.max_prompt_len} tokens: "
                   f"dropped their {n_lines} oldest history lines (shown once; raise --max-prompt-len)")
            warn_once("truncate", msg)
        return (out, ends) if line_ends else out

    def _line_ends(self, head, lines, ids):
        """Token index of each newline between the history lines (char offsets from the fast tokenizer)."""
        if len(lines) < 2:
            return []
        text = self.chat(head + "\n".join(lines))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] != ids:
            raise ModelError("the tokenizer's offsets do not match its ids; --pretrain-line-weight needs "
                             "a fast tokenizer")
        c = text.index(head + "\n".join(lines)) + len(head)
        off, at, j = enc["offset_mapping"], [], 0
        for line in lines[:-1]:
            c += len(line)                                         # c: the newline after this line
            while off[j][1] <= c:
                j += 1
            at.append(j)
            c += 1
        return at

    def split_prompt_ids(self, split, idx, n_hist=None, line_ends=False):
        """User prompts of samples idx of a data.Split, listing the n_hist most recent items (default all)."""
        idx, h = np.asarray(idx), slice(-int(n_hist) if n_hist else None, None)
        return self.user_prompt_ids(split.hist[idx][:, h], split.hist_rating[idx][:, h],
                                    split.hist_time[idx][:, h], split.time[idx], line_ends)

    def user_prefix(self):
        """The tokens every user prompt starts with (chat template + instruction, up to the history),
        found by rendering two different histories; a property of the template, never of a batch.
        [] without a dataset."""
        if self._user_prefix is None:
            a, b = (self.encode_text(self.chat(user_instruction(self.dataset.domain) + t))
                    if self.dataset else [] for t in ("0", "Z"))
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            self._user_prefix = a[:max(k - 1, 0)]   # one token back: a merge at the boundary never splits it
        return self._user_prefix

    # ---- LM head: reasoning, decoded in one cached pass that also yields h_T ----
    def _closes_anchor(self):
        """Bool [V]: tokens whose text holds the anchor's last char; only then is the tail decoded."""
        if self._closes is None:
            V, n = self.lm_weight.shape[0], min(self.lm_weight.shape[0], len(self.tok))
            # token strings, not decoded text: fast for 150k vocabularies; over-inclusive is harmless (a
            # byte-fallback piece like <0x3E> holds the '>' too), since a hit only triggers a decode
            pieces = self.tok.convert_ids_to_tokens(list(range(n)))
            self._closes = [p is None or ANCHOR[-1] in p for p in pieces] + [False] * (V - n)
        return self._closes

    def assemble(self, prompts, comps, lps, n_sampled, cut):
        """Lists -> rollout dict: [prompt LEFT-padded to P | completion RIGHT-padded to C]."""
        ids, mask = self.pad_left(prompts)
        N, P, C = len(prompts), ids.shape[1], max(len(c) for c in comps)
        tail = torch.full((N, C), self.pad_id, dtype=torch.long)
        cm, sm = torch.zeros(N, C, dtype=torch.bool), torch.zeros(N, C, dtype=torch.bool)
        lp = torch.zeros(N, C)
        for i, c in enumerate(comps):
            tail[i, :len(c)] = torch.tensor(c, dtype=torch.long)
            cm[i, :len(c)] = True
            sm[i, :n_sampled[i]] = True
            lp[i, :n_sampled[i]] = torch.tensor(lps[i][:n_sampled[i]])
        z, dev = torch.zeros(N, P, dtype=torch.bool), self.device
        return dict(input_ids=torch.cat([ids, tail.to(dev)], 1),
                    attention_mask=torch.cat([mask, cm.long().to(dev)], 1),
                    completion_mask=torch.cat([z, cm], 1).to(dev),
                    sampled_mask=torch.cat([z, sm], 1).to(dev),
                    old_logp=torch.cat([z.float(), lp], 1).to(dev),
                    lengths=torch.tensor([len(c) for c in comps], device=dev),
                    cut=torch.tensor(cut, device=dev), prompt_len=P)

    @torch.no_grad()
    def decode(self, prompts, G=1, greedy=True, temperature=1.0, top_k=0, max_new_tokens=640, seed=0, first=0,
               greedy_first=False):
        """Reasoning for B prompts (G chains each, group members adjacent) and h_T, in ONE cached pass.

        The prompts are encoded once (the template prefix they share once for all) and their KV cache repeated
        G times. Each step samples (or argmaxes) one token per row and feeds it; a row that stopped feeds
        nothing more (mask 0, so no later query sees it). Rows that wrote the anchor keep the hidden state at
        its last token as h_T; rows cut off at max_new_tokens (or ending their turn: the end-of-turn token is
        dropped) get the anchor fed at the end. max_new_tokens=0: no reasoning (the anchor after the prompt).
        Sampling noise: chain g of prompt b draws its uniforms from the seed [*seed, first + b, g] (seed: an
        int or a tuple of ints; first: the position of prompts[0] in a larger batch), so a chain is the same
        whatever batch, process (torchrun) or micro-batch split it is decoded in. greedy_first: chain 0 of
        each group is the greedy one (what evaluation reads), the G - 1 others sampled.
        Returns (rollout dict, h_T [B*G, d] fp32 L2-normalised). Rollout dict: input_ids [N,L] int64 (prompt
        LEFT-padded | completion RIGHT-padded), attention_mask [N,L], completion_mask [N,L] bool (reasoning +
        anchor), sampled_mask [N,L] bool (tokens actually sampled), old_logp [N,L] fp32 (log-prob of each
        sampled token under softmax(logits / temperature), untruncated by top-k, i.e. what forward_both
        recomputes; 0 elsewhere), lengths [N], cut [N] bool, prompt_len int."""
        room = 0 if torch.is_grad_enabled() else max_new_tokens + len(self.anchor_ids)   # in-place KV writes
        cache, pre = new_cache(self.model, room), self.user_prefix()
        k = len(pre) if pre and all(len(p) > len(pre) and p[:len(pre)] == pre for p in prompts) else 0
        if k:   # the template every user prompt starts with runs once; its KV cache is shared by the rows
            one = torch.ones(1, k, dtype=torch.long, device=self.device)
            pos0 = torch.arange(k, device=self.device)[None]
            self.hidden(torch.tensor([pre], device=self.device), one, pos0, cache)
            cache.batch_repeat_interleave(len(prompts))
        ids, mask = self.pad_left([p[k:] for p in prompts])                            # [B, P - k]
        pos = k + (mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([mask.new_ones(len(prompts), k), mask], 1)                    # [B, P]
        h = self.hidden(ids, mask, pos, cache)[:, -1]                                  # [B, d]
        if G > 1:
            cache.batch_repeat_interleave(G)
            h, mask, pos = (x.repeat_interleave(G, 0) for x in (h, mask, pos))
        N, dev, next_pos = h.shape[0], h.device, pos[:, -1] + 1                       # next_pos [N]
        h_T = torch.zeros(N, h.shape[1], device=dev)
        seeds = [seed] if isinstance(seed, int) else list(seed)
        noise = None   # [N, max_new_tokens] fp64, one stream per chain
        if not greedy:
            rngs = [np.random.default_rng(seeds + [first + i // G, i % G]) for i in range(N)]
            noise = torch.from_numpy(np.stack([g.random(max_new_tokens) for g in rngs])).to(dev)
            if greedy_first:
                noise[::G] = -1.0   # sample_next: u < 0 -> argmax
        closes, tail = self._closes_anchor(), len(ANCHOR) + 2
        # going back steps (cache.crop) is exact until a sliding window (Gemma-2's) fills: else 1-token blocks
        wins = [x.sliding_window - 1 for x in getattr(cache, "layers", []) if getattr(x, "is_sliding", False)]
        cols = mask.shape[1] + max_new_tokens + len(self.anchor_ids)   # the most the cache will hold
        K = DECODE_BLOCK if all(cols < w for w in wins) else 1
        stops = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=dev)
        toks = torch.full((N, max_new_tokens), -1, device=dev)   # [N, M] fed tokens, -1: not fed
        lps = torch.zeros(N, max_new_tokens, device=dev)         # [N, M] their log-probs
        live = torch.ones(N, dtype=torch.bool, device=dev)       # [N] fed at the next step
        comps, hit, hs, s = [[] for _ in range(N)], [False] * N, [], 0   # hs: the block's hidden states
        padded = len({len(p) for p in prompts}) > 1   # the mask holds a 0 from the start
        seen = None   # [N, V] how often each token is in the row's prompt + chain (the repetition penalty)
        if self.repetition_penalty != 1.0:
            seen = torch.zeros(N, self.lm_weight.shape[0], device=dev).scatter_add_(
                1, ids.repeat_interleave(G, 0), mask[:, k:].float())                   # the prefix: below
            seen[:, pre[:k]] = 1.0

        def feed(tok, fed):   # one column: tok [N], fed [N] bool (False: masked out, position not advanced)
            nonlocal mask, next_pos
            mask = torch.cat([mask, fed.long()[:, None]], 1)
            out = self.hidden(tok[:, None], mask, next_pos[:, None], cache)[:, -1]     # [N, d]
            next_pos = next_pos + fed.long()
            return out

        def crop(e):   # back to before step e < s: the columns of steps e..s-1 dropped, exactly
            nonlocal mask, next_pos
            if seen is not None:   # and their tokens unseen
                seen.scatter_add_(1, toks[:, e:s].clamp(min=0), -(toks[:, e:s] >= 0).float())
            cache.crop(e - s)
            next_pos = next_pos - mask[:, e - s:].sum(1)                                # [N]
            mask = mask[:, :e - s]
        while s < max_new_tokens:   # no host sync but at block ends
            u, rp = None if greedy else noise[:, s], self.repetition_penalty
            tok, lp = sample_next(self.logits(h), temperature, greedy, top_k, u, seen, rp)
            live &= ~torch.isin(tok, stops)   # ended its turn: the token dropped, the anchor fed below
            toks[:, s] = torch.where(live, tok, -1)
            lps[:, s] = lp
            h = feed(tok, live)
            if seen is not None:
                seen.scatter_add_(1, tok[:, None], live[:, None].float())
            hs.append(h)
            s += 1
            if len(hs) < K and s < max_new_tokens:
                continue
            b0 = s - len(hs)
            blk, closed = toks[:, b0:s].tolist(), []   # the block's one host copy [N, <= K]
            for i, row in enumerate(blk):
                for j, t in enumerate(row):
                    if t < 0:   # not fed: ended its turn, or wrote the anchor before this block
                        break
                    comps[i].append(t)
                    # the anchor spans several tokens: check the decoded tail when a token could close it
                    if closes[t] and ANCHOR in self.tok.decode(comps[i][-tail:]):
                        hit[i] = True
                        closed.append((i, j))
                        break
            e = b0 + min((j for _, j in closed), default=K) + 1   # the step after the block's first anchor
            # token by token, that row is masked from step e: if that is the mask's first 0, transformers'
            # SDPA changes kernel there (it drops an all-1 mask), so steps e.. run again, as they ran then
            if not padded and e < s and min(min(row[:e - b0 + 1]) for row in blk) >= 0:
                closed = [(i, j) for i, j in closed if b0 + j + 1 == e]
                hit, comps = [x and len(c) <= e for x, c in zip(hit, comps)], [c[:e] for c in comps]
                crop(e)
                s, h, live = e, hs[e - 1 - b0], toks[:, e - 1] >= 0
            if closed:
                at = torch.tensor(closed, device=dev).T                                # [2, n] rows, steps
                h_T[at[0]] = torch.stack(hs)[at[1], at[0]].float()                     # after its last token
                live[at[0]] = False
            hs = []
            if all(x or len(c) < s for x, c in zip(hit, comps)):   # all done: token by token, it stops at e
                e = max(len(c) - x for x, c in zip(hit, comps)) + 1
                if e < s:   # so the anchor fed below sees the same columns (their number moves the rounding)
                    crop(e)
                break
        n_sampled = [len(c) for c in comps]
        lps = lps[:, :max(n_sampled)].tolist()
        cut = [not x for x in hit]
        need = torch.tensor(cut, device=dev)
        if not all(hit):
            for a in self.anchor_ids:
                h = feed(torch.full((N,), a, dtype=torch.long, device=dev), need)
            h_T = torch.where(need[:, None], h.float(), h_T)
        comps = [c if hit[i] else c + list(self.anchor_ids) for i, c in enumerate(comps)]
        ro = self.assemble([p for p in prompts for _ in range(G)], comps, lps, n_sampled, cut)
        return ro, self.item_head(h_T)

    def decode_completions(self, ro):
        P = ro["prompt_len"]
        return [self.tok.decode(row[P:P + int(n)].tolist()) for row, n in zip(ro["input_ids"], ro["lengths"])]

    # ---- one pass for both heads, the shared prefix encoded once ----
    def prefix_forward(self, pre_ids, pre_mask, suf_ids, suf_mask, repeat=1, prefix=False):
        """Hidden states of rows [prefix | suffix] where each prefix row (LEFT-padded, [R, P]) is shared by
        `repeat` consecutive suffix rows (RIGHT-padded, [R*repeat, S]): the prefix runs once, its KV cache
        is repeated (differentiably), the suffix attends to it. Same math as one forward over the
        concatenation. -> (h of the prefix's last token [R*repeat, d], suffix hidden states [R*repeat, S, d]),
        + the prefix's hidden states [R, P, d] with prefix=True.
        Under gradient checkpointing in training mode (no KV cache there): rows_forward, the same results."""
        if self.grad_ckpt and self.model.training:
            return self.rows_forward(pre_ids, pre_mask, suf_ids, suf_mask, repeat, prefix)
        cache = new_cache(self.model)
        pos = (pre_mask.cumsum(-1) - 1).clamp(min=0)                                   # [R, P]
        H = self.hidden(pre_ids, pre_mask, pos, cache)                                 # [R, P, d]
        hp = H[:, -1]
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)
            hp, pre_mask, pos = (x.repeat_interleave(repeat, 0) for x in (hp, pre_mask, pos))
        mask = torch.cat([pre_mask, suf_mask], 1)                                      # [N, P+S]
        spos = pos[:, -1:] + suf_mask.cumsum(-1)                                       # [N, S]
        return (hp, self.hidden(suf_ids, mask, spos, cache)) + ((H,) if prefix else ())

    def rows_forward(self, pre_ids, pre_mask, suf_ids, suf_mask, repeat=1, prefix=False):
        """prefix_forward's results from ONE cache-free forward (use_cache=False) over the full rows
        [prefix | suffix], each prefix row repeated for its `repeat` suffix rows; positions from the attention
        mask. The gradient-checkpointing path: the prefix is recomputed per row, no KV cache is kept."""
        if repeat > 1:
            pre_ids, pre_mask = pre_ids.repeat_interleave(repeat, 0), pre_mask.repeat_interleave(repeat, 0)
        P = pre_ids.shape[1]
        mask = torch.cat([pre_mask, suf_mask.to(pre_mask.dtype)], 1)                   # [N, P+S]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.hidden(torch.cat([pre_ids, suf_ids], 1), mask, pos)                   # [N, P+S, d]
        return (h[:, P - 1], h[:, P:]) + ((h[::repeat, :P],) if prefix else ())

    def forward_both(self, ro, G=1, temperature=1.0, return_entropy=False):
        """One backbone pass over rollout rows (whole groups of G sharing a prompt, encoded once) ->
        (logp [N, C] of the completion tokens at `temperature`, 0 on padding; h_T [N, d] fp32 L2-normalised
        at the last real token; entropy [N, C] or None). No [N, C, V] logits: the log-probs come from the
        hidden states and the LM head weight via kernels.logprobs.token_logprobs (soft-capped like .logits).
        Under gradient checkpointing in training mode, full rows in one cache-free pass (rows_forward)."""
        P, ids, am = ro["prompt_len"], ro["input_ids"], ro["attention_mask"]
        hp, hs = self.prefix_forward(ids[::G, :P], am[::G, :P], ids[:, P:], am[:, P:], G)   # [N,d], [N,C,d]
        pred = torch.cat([hp[:, None], hs[:, :-1]], 1)            # hidden that predicts completion token j
        m = ro["completion_mask"][:, P:].bool()
        out = token_logprobs(pred[m], self.lm_weight, ids[:, P:][m], temperature,
                             return_entropy=return_entropy, impl=self.impl, softcap=self.softcap)
        lp, ent = out if return_entropy else (out, None)
        logp = torch.zeros(m.shape, device=hs.device).masked_scatter(m, lp.float())   # [N, C]
        if ent is not None:
            ent = torch.zeros(m.shape, device=hs.device).masked_scatter(m, ent.float())
        last = am[:, P:].sum(1) - 1                                                    # [N] last real token
        h_T = self.item_head(hs[torch.arange(len(last)), last])
        return logp, h_T, ent

    # ---- item head ----
    def item_head(self, h):
        """The item head (§3.1): final hidden states [..., d] -> the vectors the catalog scores, fp32 and
        L2-normalised, so that a dot product / tau is s(v) = cos(h_T, h_v) / tau. Users' h_T and items' h_v
        both pass here and nowhere else; a dot-product head would return h.float() (and a different tau)."""
        return F.normalize(h.float(), dim=-1)

    def item_prefix(self):
        """The longest token prefix shared by every item prompt (the template), encoded once per batch."""
        if self._item_prefix is None:
            allp = self.item_prompt_ids(range(1, self.dataset.num_items + 1))
            k, first = min(len(p) for p in allp) - 1, allp[0]   # k: keep at least one token per suffix
            for p in allp:
                while k and p[:k] != first[:k]:
                    k -= 1
            self._item_prefix = first[:k]
        return self._item_prefix

    def encode_items(self, ids, grad=False, batch_size=256, progress=False, desc="encode items", shard=False):
        """-> h_v [n, d] fp32 L2-normalised, in the order of ids. The template prefix runs once per batch;
        batches hold items of similar length (sorted, longest first), so results are batch-free. shard=True
        (torchrun): this process encodes every world()-th of those batches, the other rows are 0."""
        ids = [int(i) for i in ids]
        pre, prompts = self.item_prefix(), self.item_prompt_ids(ids)
        k, dev = len(pre), self.device
        order = sorted(range(len(ids)), key=lambda i: -len(prompts[i]))
        starts, out, rows = range(0, len(order), batch_size), [], []
        with torch.enable_grad() if grad else torch.no_grad():
            for s in tqdm(starts[rank()::world()] if shard else starts, desc=desc, disable=not progress,
                          unit="batch", leave=False):
                rows += order[s:s + batch_size]
                sufs = [prompts[i][k:] for i in order[s:s + batch_size]]
                sid, sm = self.pad_right(sufs)
                one = torch.ones(1, k, dtype=torch.long, device=dev)
                _, hs = self.prefix_forward(torch.tensor([pre], device=dev), one, sid, sm, len(sufs))
                out.append(hs[torch.arange(len(sufs)), sm.sum(1) - 1].float())   # [b, d]
        h = torch.zeros(len(ids), self.model.config.hidden_size, device=dev)   # [n, d] in the order of ids
        if out:
            h = h.index_copy(0, torch.tensor(rows, device=dev), torch.cat(out))
        return self.item_head(h)

    def refresh_items(self, batch_size=256, verbose=False):
        """Full re-encode of the item table without gradient (eval mode, restored afterwards)."""
        was = self.model.training
        self.model.eval()
        with autocast(self.device):
            E = self.encode_items(range(1, self.dataset.num_items + 1), False, batch_size, verbose,
                                  "encode item table", shard=True)
        # torchrun: each process encoded a share of the batches, the rest is 0
        self.table.E[1:] = all_reduce(E)
        self.table.fresh = True
        self.model.train(was)

    def scores(self, h_T):
        s = (h_T.float() @ self.table.E.T) / self.tau          # [B, N+1]
        s[:, 0] = float("-inf")
        return s

    # ---- users: evaluation-time encoding ----
    @torch.no_grad()
    def encode_users(self, prompts, max_new_tokens=640, batch_size=256, progress=False, desc="encode users",
                     shard=False):
        """Greedy reasoning + anchor -> (h_T [n, d] CPU fp32, timings {decode_s, gen_tokens, cut}).
        Batches hold prompts of similar length (sorted, longest first); rows never interact (left padding
        + position ids), so a row's h_T does not depend on its batch. shard=True (torchrun): each process
        decodes every world()-th of those same batches and the rows are summed over the processes (the
        others' are 0), so every process returns the whole H, bit for bit what one process computes."""
        if batch_size < 1:
            raise ModelError(f"encode_users: batch_size must be >= 1, got {batch_size}")
        was = self.model.training
        self.model.eval()
        order = np.argsort([-len(p) for p in prompts], kind="stable")
        H = torch.zeros(len(prompts), self.model.config.hidden_size)
        tm = {"decode_s": 0.0, "gen_tokens": 0,
              "cut": 0,         # rows that never wrote the anchor themselves
              "examples": {}}   # the greedy reasoning of prompts 0 and 1, for the log
        starts = range(0, len(order), batch_size)
        for s in tqdm(starts[rank()::world()] if shard else starts, desc=desc, disable=not progress,
                      leave=False, unit="batch"):
            b, t0 = order[s:s + batch_size], time.time()
            fit_threads(self.device)
            with autocast(self.device):
                ro, h = self.decode([prompts[i] for i in b], greedy=True, max_new_tokens=max_new_tokens)
            H[torch.from_numpy(b)] = h.cpu()
            for j in np.flatnonzero(b < 2):
                row, P = ro["input_ids"][j], ro["prompt_len"]
                tm["examples"][int(b[j])] = self.tok.decode(row[P:P + int(ro["lengths"][j])].tolist())
            tm["decode_s"] += time.time() - t0
            tm["gen_tokens"] += int(ro["sampled_mask"].sum())
            tm["cut"] += int(ro["cut"].sum()) if max_new_tokens else 0
        if shard and world() > 1:   # the wall time is the slowest process's
            H = all_reduce(H.to(self.device)).cpu()
            tm = {**all_reduce({"gen_tokens": tm["gen_tokens"], "cut": tm["cut"]}),
                  **all_reduce({"decode_s": tm["decode_s"]}, "max"), "examples": tm["examples"]}
        self.model.train(was)
        return H, tm
