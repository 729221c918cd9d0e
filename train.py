"""Train R²ec with RecPO (SPEC §3-§5), one plain loop, top to bottom.

    python train.py --dataset ml-100k                 # tiny backbone, CPU: <= 10 min, test table at the end
    python train.py --dataset synthetic --max-steps 60 --eval-every 20
    python train.py --init-from ~/models/Qwen2.5-3B-Instruct --dataset amazon-2023:Video_Games --data-dir ~/amazon
    python train.py --resume out/ml-100k/last          # continue exactly where a run stopped

The loop: data -> model -> item table (full encode) -> for each step: sample training users -> G reasoning
rollouts (temperature, top-k) -> one no-grad forward gives h_T and the rollout log-probs -> rewards over the
full catalog (history masked) -> group advantages -> --num-iterations passes over micro-batches with gradient
accumulation (forward_both -> token loss + item loss, the batch's target items re-encoded WITH grad and written
back into the table) -> clip -> AdamW -> LR schedule. The item table is fully re-encoded every --item-refresh
steps and before every evaluation; valid NDCG@10 (greedy reasoning) selects the best checkpoint; at the end the
best checkpoint is scored on the FULL test split next to popularity (and SASRec when baselines.py has run).

CPU defaults differ from the paper's where the 10-minute budget forces it (the effective value of every flag
is printed at start; `auto` flags resolve to the paper's value on CUDA):
  --max-new-tokens 640 -> 8 on CPU    reasoning costs one decode step per token per user; 8 keeps the greedy
                                      test pass over all 9,906 ml-100k users affordable
  --prompt-history 20 -> 8 on CPU     the prompt lists the 8 most recent of the H=20 history items (attention
                                      and MLP cost grow with prompt length); all 20 are still masked in ranking
  --val-samples all -> 1000 on CPU    model selection on a fixed seeded subset of valid; test is always full
  --item-loss inbatch -> sampled      in-batch negatives are drawn by popularity, so the in-batch softmax
                                      learns scores with popularity divided out; 128 uniform negatives,
                                      re-encoded WITH grad each step, keep popularity in the scores (and refresh
                                      the table on the way). "full" (SPEC's beyond-the-paper loss) compares the
                                      fresh target with stale rows: a shortcut the model learns, then collapses
  --train-recent all -> 10000 on CPU  a short run sees ~10k users: draw them from the end of train
  --embed-lr-mult 1 -> 0.1 (tiny)     the tiny backbone ties its LM head to the token embedding (trained in full).
                                      Adam moves every weight ~lr per step whatever the gradient's size, so at
                                      lr 2e-3 a few LM-head rows grew ~9x in ~250 steps (' a': norm 0.23 -> 1.97),
                                      the reasoning's entropy fell 7.7 -> 0.2, 90-100% of groups then had G equal
                                      rewards, all advantages were 0 and RecPO (token AND item loss) stopped
                                      learning. At 0.1x the entropy stays 7.7, zero-std groups ~0%, and valid
                                      NDCG@10 at step 125 was 0.0319 vs 0.0226 at step 100 without it. (An entropy
                                      bonus, --entropy-coef 0.02, kept entropy too but wrecked h_T: valid NDCG@10
                                      0.0006 at step 125 -- its gradient reaches the same final hidden state.)
  --lora-r 4 applies to Hugging Face backbones only; the tiny built-in backbone is trained in full.
"""
import argparse
import copy
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import eval as ev
import model as M
import recpo


class TrainError(Exception):
    """User-facing error: main() prints `error: <msg>` and exits 2."""


# ----------------------------------------------------------------------------------------------------------
# config

def get_parser():
    p = argparse.ArgumentParser(description="Train R²ec with RecPO (SPEC §4); defaults: paper values on CUDA, "
                                "a 10-minute tiny run on CPU ('auto' flags).")
    # data
    p.add_argument("--dataset", default="ml-100k", help="ml-100k | synthetic | amazon-2023:<Category> | csv:<dir> (see data.py)")
    p.add_argument("--data-dir", default=None, help="folder with the raw dataset files (data.py's default if unset)")
    p.add_argument("--history", type=int, default=20, help="history window H of the samples [paper: 20]")
    p.add_argument("--prompt-history", default="auto", help="most recent history items listed in the prompt "
                   "(all H are masked in ranking) [paper: all = H; auto: H on CUDA, 8 on CPU]")
    p.add_argument("--max-prompt-len", type=int, default=None, help="prompt token cap; oldest history lines dropped "
                   "beyond it (default: model.py's, from the context size)")
    p.add_argument("--train-recent", default="auto", help="draw training users from the most recent N train "
                   "samples only (0 = all) [paper: all; auto: all on CUDA, 10000 on CPU, where a short run sees "
                   "~1-2k users: the recent ones are closest to the valid/test period]")
    p.add_argument("--synthetic-users", type=int, default=600, help="synthetic dataset: number of users")
    p.add_argument("--synthetic-items", type=int, default=400, help="synthetic dataset: number of items")
    # model
    p.add_argument("--init-from", default="tiny", help="'tiny' (built-in Qwen2-shaped config, tokenizer trained on the "
                   "dataset's text) or a local Hugging Face model directory / .gguf file (never downloaded)")
    p.add_argument("--tiny-layers", type=int, default=2, help="tiny backbone: transformer layers")
    p.add_argument("--tiny-hidden", type=int, default=128, help="tiny backbone: hidden size")
    p.add_argument("--tiny-heads", type=int, default=4, help="tiny backbone: attention heads")
    p.add_argument("--tiny-vocab", type=int, default=4096, help="tiny backbone: BPE vocabulary size (upper bound)")
    p.add_argument("--lora-r", type=int, default=4, help="LoRA rank for Hugging Face backbones [paper: 4]; 0 = full "
                   "fine-tuning; the tiny backbone is always fully trained")
    p.add_argument("--lora-alpha", type=float, default=128.0, help="LoRA alpha [paper: 128]")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--tau", type=float, default=0.02, help="cosine temperature of the item head, s = cos/tau [paper: 0.02]")
    # rollouts
    p.add_argument("--num-generations", type=int, default=4, help="reasoning chains per user, G [paper: 4]")
    p.add_argument("--temperature", type=float, default=2.0, help="sampling temperature of rollouts [paper: 2.0]")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling of rollouts, 0 = off [paper: 50]")
    p.add_argument("--max-new-tokens", default="auto", help="reasoning token limit, train and eval "
                   "[paper: 640; auto: 640 on CUDA, 8 on CPU]")
    p.add_argument("--no-reasoning", action="store_true", help="ablation 'w/o reasoning': the anchor right after the "
                   "prompt (rollouts then differ in nothing: only the item loss with G copies learns)")
    # reward
    p.add_argument("--reward", default="mix", choices=recpo.REWARD_KINDS, help="ndcg: R_d, softmax: R_c, "
                   "mix: (1-beta) R_d + beta R_c [paper: mix]")
    p.add_argument("--reward-k", type=int, default=1000, help="R_d = 1/log2(r+2) if rank r < k else 0 [paper: 1000]")
    p.add_argument("--reward-beta", type=float, default=0.05, help="weight beta of R_c in the mix [paper: 0.05]")
    # policy loss
    p.add_argument("--advantage", default="gaussian", choices=recpo.ADVANTAGE_KINDS,
                   help="gaussian: z-score in the group [paper]; loo: leave-one-out baseline")
    p.add_argument("--loss-type", default="token-mean", choices=recpo.LOSS_TYPES,
                   help="aggregation of the token loss over completion tokens [paper: token-mean]")
    p.add_argument("--clip-low", type=float, default=0.2, help="PPO clip epsilon below 1 [paper: 0.2]")
    p.add_argument("--clip-high", type=float, default=0.28, help="PPO clip epsilon above 1 [paper: 0.28]")
    p.add_argument("--item-loss", default="auto", choices=("auto",) + recpo.ITEM_LOSS_MODES + ("sampled",),
                   help="inbatch: softmax over the batch's targets [paper]; full: over the whole cached item table "
                   "(beyond the paper; its rows are as stale as the last refresh); sampled: over --item-negatives "
                   "uniformly drawn items re-encoded this step + the batch's targets (all candidates fresh) "
                   "[auto: inbatch on CUDA, sampled on CPU]")
    p.add_argument("--item-negatives", type=int, default=128, help="sampled item loss: items drawn per step, "
                   "re-encoded without grad and written back into the table (a rolling refresh)")
    p.add_argument("--relabel-topk", type=int, default=1, help="item loss on the top-k trajectories by advantage "
                   "of each group (the reference code's relabel_topk) [paper: 1; its launch script: 2]")
    p.add_argument("--kl-beta", type=float, default=0.0, help="k3 KL to a frozen copy of the initial model "
                   "[paper: 0 = off]")
    p.add_argument("--reference-broadcast", action="store_true", help="ablation: reproduce the reference code's "
                   "(N,1)x(N,1,1) broadcast defect (SPEC §4; see recpo.py)")
    # optimization
    p.add_argument("--batch-size", type=int, default=32, help="training users per step (each with G rollouts)")
    p.add_argument("--micro-batch-size", default="auto", help="users per forward/backward (gradient accumulation "
                   "over batch-size / micro-batch-size; in-batch item candidates are per micro-batch) "
                   "[auto: 4 on CUDA, = --batch-size on CPU]")
    p.add_argument("--num-iterations", type=int, default=1, help="optimizer passes over each rollout batch "
                   "(PPO epochs; >1 makes the clipping bite) [paper: 1]")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default: 2e-3 tiny, 1e-5 HF)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--embed-lr-mult", default="auto", help="LR multiplier of the token embedding (tied to the LM "
                   "head) when it is trained [paper: 1 (one LR); auto: 0.1 for the tiny backbone, else 1]")
    p.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus: minus this x the token-mean "
                   "entropy (at the rollout temperature) of the sampled reasoning tokens is added to the loss "
                   "[paper: 0 = off]")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear LR warmup steps")
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "constant"), help="LR after warmup")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    p.add_argument("--max-steps", type=int, default=2000, help="training steps (RL steps: rollouts + update)")
    p.add_argument("--time-budget", type=float, default=None, help="minutes for the whole run: training stops "
                   "early enough for the final test pass to fit (default: 10 on CPU, off on CUDA; 0 = off)")
    # item table and evaluation
    p.add_argument("--item-refresh", type=int, default=20, help="re-encode the full item table every N steps "
                   "(and always before evaluation)")
    p.add_argument("--item-batch-size", type=int, default=256, help="batch size of item table encoding")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate on valid every N steps (0: only at the end)")
    p.add_argument("--val-samples", default="auto", help="valid samples used for model selection: 'all' or a count "
                   "(fixed seeded subset) [auto: all on CUDA, 1000 on CPU]; the final test is always the full split")
    p.add_argument("--eval-batch-size", type=int, default=256, help="users per greedy-reasoning batch at evaluation")
    p.add_argument("--patience", type=int, default=5, help="stop after this many evaluations without a better "
                   "valid NDCG@10 (0 = never)")
    p.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    # logging, checkpoints, system
    p.add_argument("--log-every", type=int, default=5, help="one log line + one log.jsonl record every N steps")
    p.add_argument("--out", default=None, help="output folder (default out/<dataset-slug>); holds best/, last/, log.jsonl")
    p.add_argument("--resume", default=None, help="checkpoint folder (e.g. out/ml-100k/last) to continue exactly; "
                   "flags given explicitly override its saved config")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU) | cpu | cuda[:i]")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch", "reference"),
                   help="impl= for the catalog and log-prob kernels (auto: Triton on CUDA, chunked PyTorch on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, user sampling and rollouts")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_config(argv):
    """argparse -> dict; 'auto' values resolved for the device; --resume: the saved config + explicit flags."""
    p = get_parser()
    args = p.parse_args(argv)
    cfg = vars(args)
    if args.resume:
        path = os.path.join(args.resume, "run_config.json")
        if not os.path.isfile(path):
            raise TrainError(f"--resume {args.resume}: not a checkpoint folder (no run_config.json)")
        with open(path) as f:
            saved = json.load(f)
        given = _explicit(p, argv)
        cfg = {**saved, **{k: cfg[k] for k in given}, "resume": args.resume}
        return cfg
    dev = cfg["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {dev}: CUDA is not available here; use --device cpu")
    cfg["device"] = dev
    cpu = dev == "cpu"
    auto = {"prompt_history": "8" if cpu else "all", "max_new_tokens": 8 if cpu else 640,
            "val_samples": "1000" if cpu else "all", "train_recent": "10000" if cpu else "0",
            "item_loss": "sampled" if cpu else "inbatch", "micro_batch_size": cfg["batch_size"] if cpu else 4}
    for k, v in auto.items():
        if cfg[k] == "auto":
            cfg[k] = v
    cfg["max_new_tokens"] = int(cfg["max_new_tokens"])
    cfg["prompt_history"] = cfg["history"] if cfg["prompt_history"] == "all" else int(cfg["prompt_history"])
    cfg["train_recent"] = int(cfg["train_recent"])
    cfg["micro_batch_size"] = min(int(cfg["micro_batch_size"]), cfg["batch_size"])
    cfg["val_samples"] = 0 if cfg["val_samples"] == "all" else int(cfg["val_samples"])
    if cfg["time_budget"] is None:
        cfg["time_budget"] = 10.0 if cpu else 0.0
    cfg["embed_lr_mult"] = (0.1 if cfg["init_from"] == "tiny" else 1.0) if cfg["embed_lr_mult"] == "auto" \
        else float(cfg["embed_lr_mult"])
    if cfg["lr"] is None:
        cfg["lr"] = 2e-3 if cfg["init_from"] == "tiny" else 1e-5
    if cfg["out"] is None:
        cfg["out"] = os.path.join("out", "".join(c if c.isalnum() or c in "._-" else "-" for c in cfg["dataset"]))
    if cfg["batch_size"] % cfg["micro_batch_size"]:
        raise TrainError(f"--batch-size {cfg['batch_size']} must be a multiple of --micro-batch-size "
                         f"{cfg['micro_batch_size']}")
    if cfg["reference_broadcast"] and cfg["item_loss"] == "sampled":
        raise TrainError("--reference-broadcast reproduces the reference code's in-batch/full item loss; "
                         "combine it with --item-loss inbatch or full, not sampled")
    if cfg["num_generations"] < 2:
        raise TrainError("--num-generations must be >= 2: advantages are relative within a group")
    return cfg


def _explicit(parser, argv):
    """Names of the flags given on the command line (so they override a resumed config)."""
    argv = sys.argv[1:] if argv is None else argv
    opts = {o: a.dest for a in parser._actions for o in a.option_strings}
    return {opts[t.split("=")[0]] for t in argv if t.split("=")[0] in opts}


# ----------------------------------------------------------------------------------------------------------
# small helpers

def autocast(device):
    # CUDA: bf16 autocast around every forward (tiny weights and LoRA adapters stay fp32); CPU: plain fp32
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def subset(split, idx):
    return data.Split(**{f: getattr(split, f)[idx] for f in data.FIELDS})


def subset_view(ds, split_name, idx):
    """A stand-in dataset whose `split_name` split is the subset idx (eval.evaluate scores all of a split)."""
    sub = subset(ds.split(split_name), idx)
    return argparse.Namespace(name=ds.name, num_items=ds.num_items, train=ds.train, split=lambda _: sub)


def prompt_ids(r, split, idx, n_hist):
    """Chat-rendered user prompts of samples idx, listing the n_hist most recent history items."""
    idx, h = np.asarray(idx), slice(-int(n_hist), None)
    return r.user_prompt_ids(split.hist[idx][:, h], split.hist_rating[idx][:, h], split.hist_time[idx][:, h],
                             split.time[idx])


def train_indices(step, B, n, seed):
    """Training samples of step `step`: positions step*B .. step*B+B-1 of a seeded permutation per epoch.
    A pure function of (step, seed), so a resumed run draws exactly the users the interrupted one would."""
    pos = np.arange(step * B, step * B + B)
    out = np.empty(B, dtype=np.int64)
    for ep in np.unique(pos // n):
        sel = pos // n == ep
        out[sel] = np.random.default_rng([seed, int(ep)]).permutation(n)[pos[sel] % n]
    return out


def lr_at(step, cfg):
    """Linear warmup, then cosine to min_lr_frac * lr over --max-steps (or constant)."""
    lr, w = cfg["lr"], cfg["warmup_steps"]
    if step < w:
        return lr * (step + 1) / w
    if cfg["lr_schedule"] == "constant":
        return lr
    t = min(1.0, (step - w) / max(1, cfg["max_steps"] - w))
    return lr * (cfg["min_lr_frac"] + (1 - cfg["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))


def rng_state():
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def trim(ro, rows):
    """Rows of a rollout dict, without the columns that are padding in every one of them."""
    am = ro["attention_mask"][rows]
    cols = am.any(0).nonzero().squeeze(1)
    c = slice(int(cols[0]), int(cols[-1]) + 1)
    out = {k: ro[k][rows][:, c] for k in ("input_ids", "attention_mask", "completion_mask", "sampled_mask",
                                          "old_logp")}
    out["rows"], out["prompt_len"] = rows, ro["prompt_len"] - int(cols[0])
    return out


# ----------------------------------------------------------------------------------------------------------
# decoding: reasoning and h_T in one cached pass

@torch.no_grad()
def decode(r, prompts, G=1, greedy=True, temperature=1.0, top_k=0, max_new_tokens=8, seed=0):
    """model.R2ec.generate + the h_T of forward_both, in ONE cached pass (no second forward over the prompt).

    The B prompts are encoded once and their KV cache repeated G times (group members adjacent). Each step
    samples (or argmaxes) one token per row and feeds it; a row that stopped feeds nothing more (mask 0, so
    no later query sees it). Rows that wrote the anchor keep the hidden state at its last token as h_T; rows
    cut off at max_new_tokens (or ending their turn: the end-of-turn token is dropped, as in model.generate)
    get the anchor fed at the end. max_new_tokens=0 is the w/o-reasoning variant (anchor after the prompt).
    Returns (rollout dict exactly as model.generate's, h_T [B*G, d] fp32 L2-normalised)."""
    from transformers import DynamicCache
    ids, mask = r._pad_left(prompts)                                                   # [B, P]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        cache = DynamicCache(config=r.model.config)
    except TypeError:
        cache = DynamicCache()
    h = r._hidden(ids, mask, pos, cache)[:, -1]                                        # [B, d]
    if G > 1:
        cache.batch_repeat_interleave(G)
        h, mask, pos = h.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), pos.repeat_interleave(G, 0)
    N, dev = h.shape[0], h.device
    next_pos = pos[:, -1] + 1                                                          # [N]
    h_T = torch.zeros(N, h.shape[1], device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    closes, tail = r._closes_anchor(), len(M.ANCHOR) + 2
    comps, lps = [[] for _ in range(N)], [[] for _ in range(N)]
    done, hit = [False] * N, [False] * N

    def feed(tok, fed):   # one column: tok [N], fed [N] bool (False: masked out, position not advanced)
        nonlocal mask, next_pos
        mask = torch.cat([mask, fed.long()[:, None]], 1)
        out = r._hidden(tok[:, None], mask, next_pos[:, None], cache)[:, -1]           # [N, d]
        next_pos = next_pos + fed.long()
        return out

    for _ in range(max_new_tokens):
        if all(done):
            break
        tok, lp = M.sample_next(r._logits(h), temperature, greedy, top_k, 1.0, gen)   # [N], [N] as generate
        fed, closed = [False] * N, []
        for i, (t, l) in enumerate(zip(tok.tolist(), lp.tolist())):
            if done[i]:
                continue
            if t in r.stop_ids:   # ended its turn before the anchor: dropped, the anchor is fed below
                done[i] = True
                continue
            comps[i].append(t)
            lps[i].append(l)
            fed[i] = True
            if closes[t] and M.ANCHOR in r.tok.decode(comps[i][-tail:]):
                done[i] = hit[i] = True
                closed.append(i)
        h = feed(tok, torch.tensor(fed, device=dev))
        if closed:
            h_T[closed] = h[closed].float()
    n_sampled = [len(c) for c in comps]
    need = torch.tensor([not x for x in hit], device=dev)
    if need.any():
        for a in r.anchor_ids:
            h = feed(torch.full((N,), a, dtype=torch.long, device=dev), need)
        h_T[need] = h[need].float()
    comps = [c if hit[i] else c + list(r.anchor_ids) for i, c in enumerate(comps)]
    ro = r._assemble([p for p in prompts for _ in range(G)], comps, lps, n_sampled, [not x for x in hit])
    return ro, torch.nn.functional.normalize(h_T, dim=-1)


# ----------------------------------------------------------------------------------------------------------
# shared-prefix forwards: the G rollouts of a user share the prompt, all item prompts share their template

def _cache(r):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=r.model.config)
    except TypeError:
        return DynamicCache()


def prefix_forward(r, pre_ids, pre_mask, suf_ids, suf_mask, repeat=1):
    """Hidden states of rows [prefix | suffix] where each prefix row (LEFT-padded, [R, P]) is shared by
    `repeat` consecutive suffix rows (RIGHT-padded, [R*repeat, S]): the prefix runs once, its KV cache is
    repeated (differentiably), the suffix attends to it. Same math as one forward over the concatenation.
    -> (h of the prefix's last token [R*repeat, d], suffix hidden states [R*repeat, S, d])."""
    cache = _cache(r)
    pos = (pre_mask.cumsum(-1) - 1).clamp(min=0)                                       # [R, P]
    hp = r._hidden(pre_ids, pre_mask, pos, cache)[:, -1]                               # [R, d]
    if repeat > 1:
        cache.batch_repeat_interleave(repeat)
        hp, pre_mask, pos = (x.repeat_interleave(repeat, 0) for x in (hp, pre_mask, pos))
    mask = torch.cat([pre_mask, suf_mask], 1)                                          # [N, P+S]
    spos = pos[:, -1:] + suf_mask.cumsum(-1)                                           # [N, S]
    return hp, r._hidden(suf_ids, mask, spos, cache)


def forward_both_shared(r, c, G, temperature=1.0, return_entropy=False):
    """R2ec.forward_both for a chunk of rollouts (whole groups), with each prompt encoded once for its G
    chains. -> (logp [N, C] of the completion tokens at temperature, h_T [N, d] L2-normalised, entropy)."""
    P = c["prompt_len"]
    ids, am, cm = c["input_ids"], c["attention_mask"], c["completion_mask"][:, P:]
    hp, hs = prefix_forward(r, ids[::G, :P], am[::G, :P], ids[:, P:], am[:, P:], G)   # [N, d], [N, C, d]
    pred = torch.cat([hp[:, None], hs[:, :-1]], 1)           # hidden that predicts completion token j
    m = cm.bool()
    out = M.token_logprobs(pred[m], r.lm_weight, ids[:, P:][m], temperature, return_entropy=return_entropy,
                           impl=r.impl)
    lp, ent = out if return_entropy else (out, None)
    logp = torch.zeros(m.shape, device=hs.device).masked_scatter(m, lp.float())       # [N, C]
    if ent is not None:
        ent = torch.zeros(m.shape, device=hs.device).masked_scatter(m, ent.float())
    last = am[:, P:].sum(1) - 1                                                        # [N] last real token
    h_T = torch.nn.functional.normalize(hs[torch.arange(len(last)), last].float(), dim=-1)
    return logp, h_T, ent


def encode_items(r, ids, grad=False, batch_size=256):
    """R2ec.encode_items with the template shared by every item prompt encoded once per batch.
    -> h_v [n, d] fp32 L2-normalised, in the order of ids."""
    ids = [int(i) for i in ids]
    if getattr(r, "_item_prefix", None) is None:   # longest common token prefix of all item prompts
        allp = r.item_prompt_ids(range(1, r.dataset.num_items + 1))
        k = min(len(p) for p in allp) - 1          # keep at least one token per suffix
        first = allp[0]
        for p in allp:
            while k and p[:k] != first[:k]:
                k -= 1
        r._item_prefix = first[:k]
    pre, prompts = r._item_prefix, r.item_prompt_ids(ids)
    k, dev = len(pre), r.device
    order = sorted(range(len(ids)), key=lambda i: -len(prompts[i]))   # similar lengths together
    out = []
    with torch.enable_grad() if grad else torch.no_grad():
        for s in range(0, len(order), batch_size):
            sufs = [prompts[i][k:] for i in order[s:s + batch_size]]
            S = max(len(x) for x in sufs)
            sid = torch.full((len(sufs), S), r.pad_id, dtype=torch.long)
            sm = torch.zeros(len(sufs), S, dtype=torch.long)
            for j, x in enumerate(sufs):
                sid[j, :len(x)], sm[j, :len(x)] = torch.tensor(x), 1
            one = torch.ones(1, k, dtype=torch.long, device=dev)
            _, hs = prefix_forward(r, torch.tensor([pre], device=dev), one, sid.to(dev), sm.to(dev), len(sufs))
            out.append(hs[torch.arange(len(sufs)), sm.sum(1).to(dev) - 1].float())      # [b, d]
    h = torch.cat(out)
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    return torch.nn.functional.normalize(h[inv.to(h.device)], dim=-1)


def refresh_items(r, batch_size=256):
    """Full re-encode of the item table, no grad, eval mode."""
    was = r.model.training
    r.model.eval()
    r.table.E[1:] = encode_items(r, range(1, r.dataset.num_items + 1), False, batch_size)
    r.table.fresh = True
    r.model.train(was)


# ----------------------------------------------------------------------------------------------------------
# evaluation of the model (greedy reasoning -> h_T -> full-catalog ranks via eval.evaluate)

@torch.no_grad()
def encode_users(r, split, idx, cfg, desc="encode users", verbose=True):
    """Greedy reasoning + anchor -> h_T [n, d] (CPU fp32) for samples idx, and timings (s).
    Batches hold prompts of similar length (sorted, longest first) to cut padding; rows never interact
    (left padding + position ids), so a row's h_T does not depend on its batch."""
    was = r.model.training
    r.model.eval()
    prompts = prompt_ids(r, split, idx, cfg["prompt_history"])
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    H = torch.empty(len(prompts), r.model.config.hidden_size)
    bs, tm = cfg["eval_batch_size"], {"decode_s": 0.0, "gen_tokens": 0}
    for s in tqdm(range(0, len(order), bs), desc=desc, disable=not verbose, leave=False, unit="batch"):
        b = order[s:s + bs]
        p = [prompts[i] for i in b]
        t0 = time.time()
        with autocast(cfg["device"]):
            ro, h = decode(r, p, greedy=True, max_new_tokens=0 if cfg["no_reasoning"] else cfg["max_new_tokens"])
        H[torch.from_numpy(b)] = h.cpu()
        tm["decode_s"] += time.time() - t0
        tm["gen_tokens"] += int(ro["sampled_mask"].sum())
    r.model.train(was)
    return H, tm


def evaluate_model(r, ds, split_name, cfg, idx=None, verbose=True):
    """Metrics of samples idx (default: all) of a split under eval.py's protocol, and timings."""
    split = ds.split(split_name)
    idx = np.arange(len(split)) if idx is None else np.asarray(idx)
    H, tm = encode_users(r, split, idx, cfg, f"eval {split_name}: reasoning", verbose)
    view = ds
    if len(idx) != len(split):   # a fixed subset: eval.evaluate sees a dataset whose split is that subset
        view = subset_view(ds, split_name, idx)
    t0 = time.time()
    m = ev.evaluate(view, split_name, lambda j: H[torch.from_numpy(j)], r.table.E, batch_size=1024,
                    tau=r.tau, verbose=False, header=False, impl=cfg["kernels"])
    tm["rank_s"] = time.time() - t0
    tm["n"] = len(idx)
    return m, tm


def latency_line(tm):
    return (f"latency: reasoning + h_T (greedy, one cached pass) {1000 * tm['decode_s'] / tm['n']:.2f} ms/user, "
            f"full-catalog scoring {1000 * tm['rank_s'] / tm['n']:.3f} ms/user "
            f"({tm['gen_tokens'] / tm['n']:.1f} reasoning tokens/user)")


def load_for_eval(path, device, ds=None):
    """A checkpoint, loaded the way training evaluated it (tiny: fp32 weights + autocast on CUDA)."""
    with open(os.path.join(path, "run_config.json")) as f:
        tiny = json.load(f).get("init_from") == "tiny"
    r, cfg, _ = M.load_checkpoint(path, device=device, dtype=torch.float32 if tiny else None, dataset=ds)
    r.impl = cfg.get("kernels", "auto")
    return r, cfg


def baseline_rows(ds, split_name="test"):
    """Popularity (computed here: cheap) and SASRec (if out/baselines/<slug>.json exists) metrics."""
    import baselines
    rows = {"popularity": baselines.evaluate_popularity(ds, split_name, verbose=False, header=False)}
    path = os.path.join("out", "baselines", baselines.slug(ds.name) + ".json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if "sasrec" in saved.get(split_name, {}):
            rows["SASRec"] = saved[split_name]["sasrec"]
    return rows


# ----------------------------------------------------------------------------------------------------------
# training

def build(cfg, ds, verbose=True):
    """-> (R2ec, trainable params, extra_state or None): fresh from --init-from, or from --resume."""
    dev, tiny = cfg["device"], cfg["init_from"] == "tiny"
    lora_r = 0 if tiny else cfg["lora_r"]
    extra, table = None, None
    if cfg.get("resume") and lora_r == 0:   # the checkpoint holds every weight: load it as is
        r0, _, extra = M.load_checkpoint(cfg["resume"], device=dev, dtype=torch.float32 if tiny else None,
                                         dataset=ds)
        model, tok, table = r0.model, r0.tok, r0.table
    else:
        tiny_cfg = dict(layers=cfg["tiny_layers"], hidden=cfg["tiny_hidden"], heads=cfg["tiny_heads"],
                        kv_heads=max(1, cfg["tiny_heads"] // 2), intermediate=int(cfg["tiny_hidden"] * 2.75) // 8 * 8,
                        vocab=cfg["tiny_vocab"], seed=cfg["seed"])
        model, tok = M.build_backbone(cfg["init_from"], ds, tiny_cfg=tiny_cfg, device=dev, verbose=verbose)
    params = M.apply_lora(model, lora_r, cfg["lora_alpha"], cfg["lora_dropout"])
    if cfg.get("resume") and lora_r > 0:   # base weights from --init-from + the saved adapter
        M.load_lora_state(model, os.path.join(cfg["resume"], "adapter.safetensors"))
        r0, _, extra = M.load_checkpoint(cfg["resume"], device="cpu", dataset=ds)
        table = r0.table
    r = M.R2ec(model, tok, ds, tau=cfg["tau"], max_prompt_len=cfg["max_prompt_len"], impl=cfg["kernels"])
    if table is not None:
        r.table.E.copy_(table.E.to(r.device))
        r.table.fresh = True
    model.train()
    return r, params, extra


def param_groups(r, params, cfg):
    """AdamW groups: the tied embedding / LM head (if trained) at lr x --embed-lr-mult, the rest at lr."""
    emb = r.lm_weight
    if not any(p is emb for p in params):
        return [{"params": params, "lr_mult": 1.0}]
    rest = [p for p in params if p is not emb]
    return [{"params": rest, "lr_mult": 1.0}, {"params": [emb], "lr_mult": cfg.get("embed_lr_mult", 1.0)}]


def save(path, r, cfg, opt, step, state):
    extra = {"step": step, "optimizer": opt.state_dict(), "rng": rng_state(), **state}
    M.save_checkpoint(path, r, {**cfg, "max_prompt_len": r.max_prompt_len}, extra)


def rollout_step(r, ds, cfg, step, ref=None):
    """Users -> G rollouts with their h_T and pi_old log-probs (one cached pass) -> rewards over the full
    catalog -> advantages. Returns a batch dict; chunks[i] = the i-th micro-batch, trimmed once here."""
    tr, B = ds.train, cfg["batch_size"]
    G = 1 if cfg["no_reasoning"] else cfg["num_generations"]
    pool = np.arange(len(tr))[-cfg["train_recent"]:] if cfg["train_recent"] else np.arange(len(tr))
    idx = pool[train_indices(step, B, len(pool), cfg["seed"])]                        # [B]
    prompts = prompt_ids(r, tr, idx, cfg["prompt_history"])
    dev = r.device
    targets = torch.from_numpy(np.repeat(tr.target[idx], G)).to(dev)                  # [B*G]
    hist = torch.from_numpy(np.repeat(tr.hist[idx], G, axis=0)).to(dev)              # [B*G, H]
    r.model.eval()
    t0 = time.time()
    neg = None
    if cfg["item_loss"] == "sampled":   # uniform negatives of the item loss (encoded with grad in the update)
        N = ds.num_items
        neg = np.sort(np.random.default_rng([cfg["seed"], step, 1]).choice(N, min(cfg["item_negatives"], N),
                                                                             replace=False) + 1)
    with torch.no_grad(), autocast(cfg["device"]):
        # the rollout seed is a function of (seed, step): a resumed run samples the same chains
        ro, h_T = decode(r, prompts, G, greedy=False, temperature=cfg["temperature"], top_k=cfg["top_k"],
                         max_new_tokens=0 if cfg["no_reasoning"] else cfg["max_new_tokens"],
                         seed=cfg["seed"] * 1_000_003 + step)                      # h_T [B*G, d]
        t_gen = time.time() - t0
        chunks, mb = [], cfg["micro_batch_size"] * G
        for s in range(0, B * G, mb):
            c = trim(ro, torch.arange(s, min(s + mb, B * G), device=dev))
            if ref is not None:   # frozen initial model, for the k3 KL
                c["ref_logp"] = ref.forward_both(c["input_ids"], c["attention_mask"], c["completion_mask"],
                                                 cfg["temperature"])[0]
            chunks.append(c)
    r.model.train()
    rw = recpo.compute_rewards(h_T, r.table.E, targets, hist, cfg["tau"], cfg["reward_k"], cfg["reward_beta"],
                               cfg["reward"], impl=cfg["kernels"])
    if G == 1:   # w/o reasoning: nothing to compare inside a group; the item loss is plain contrastive (A = 1)
        adv, frac0 = torch.ones_like(rw["reward"]), 0.0
    else:
        adv, frac0 = recpo.compute_advantages(rw["reward"], G, cfg["advantage"])   # [B*G]
    return dict(idx=idx, ro=ro, G=G, targets=targets, hist=hist, h_T=h_T, rw=rw, adv=adv, frac0=frac0,
                chunks=chunks, t_gen=t_gen, neg=neg)


def update_step(r, cfg, batch, opt, params, lr):
    """--num-iterations optimizer steps over the rollout batch, each accumulating over its micro-batches."""
    G, targets, hist, adv = batch["G"], batch["targets"], batch["hist"], batch["adv"]
    n_rows, dev = targets.shape[0], targets.device
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    stats, old_item = {}, {}
    for it in range(cfg["num_iterations"]):
        for ci, c in enumerate(batch["chunks"]):
            rows = c["rows"]
            tgt, a = targets[rows], adv[rows]                                         # [b], [b]
            uniq, inv = torch.unique(tgt, return_inverse=True)
            neg = batch["neg"]
            # items encoded WITH grad: the batch's targets (+ sampled negatives); values written back
            ids = uniq if neg is None else torch.cat([uniq, torch.from_numpy(neg).to(dev)])
            with autocast(cfg["device"]):
                logp, h_T, ent = forward_both_shared(r, c, G, cfg["temperature"], True)   # [b, C], [b, d]
                emb = encode_items(r, ids.tolist(), grad=True, batch_size=cfg["item_batch_size"])   # [u(+S), d]
            r.table.update(ids, emb)
            item_emb, h_i, t_i, a_i = emb[inv], h_T, tgt, a                          # [b, d] ...
            mode, excl, scale = cfg["item_loss"], hist[rows], 1.0
            if mode == "sampled":
                # in-batch softmax whose candidates also hold the S negatives: appended as zero-advantage
                # pseudo-groups (zero user state), which add candidates and nothing to the loss
                S = len(neg)
                pad = (-S) % G
                nid = torch.cat([ids[len(uniq):], ids[len(uniq):][:1].repeat(pad)])            # [S + pad]
                nemb = torch.cat([emb[len(uniq):], emb[len(uniq):][:1].repeat(pad, 1)])
                h_i = torch.cat([h_T, h_T.new_zeros(len(nid), h_T.shape[1])])
                item_emb, t_i = torch.cat([item_emb, nemb]), torch.cat([tgt, nid])
                a_i = torch.cat([a, a.new_zeros(len(nid))])
                mode, scale = "inbatch", len(h_i) / len(h_T)   # item_loss divides by its row count
            if cfg["num_iterations"] > 1 and it == 0:   # pi_old of the item action: this first pass, detached
                with torch.no_grad():
                    old_item[ci] = recpo.item_logprobs(h_i, item_emb, t_i, cfg["tau"], mode, r.table.E,
                                                       excl, impl=cfg["kernels"])
            tl, ts = recpo.token_loss(logp, c["old_logp"][:, c["prompt_len"]:], a,
                                      c["sampled_mask"][:, c["prompt_len"]:], cfg["clip_low"], cfg["clip_high"],
                                      cfg["loss_type"], max_len=cfg["max_new_tokens"],
                                      ref_logp=None if "ref_logp" not in c else c["ref_logp"][:, c["prompt_len"]:],
                                      kl_beta=cfg["kl_beta"], reference_broadcast=cfg["reference_broadcast"],
                                      entropy=ent)
            il, is_ = recpo.item_loss(h_i, item_emb, t_i, a_i, old_item.get(ci), G, cfg["relabel_topk"],
                                      cfg["tau"], cfg["clip_low"], cfg["clip_high"], mode, E=r.table.E,
                                      exclude=excl, reference_broadcast=cfg["reference_broadcast"],
                                      impl=cfg["kernels"])
            il = il * scale
            if cfg.get("entropy_coef"):   # bonus: keeps G chains distinct, so groups keep reward spread
                sm = c["sampled_mask"][:, c["prompt_len"]:].float()
                tl = tl - cfg["entropy_coef"] * (ent * sm).sum() / sm.sum().clamp(min=1)
            is_["item_loss"] = il.item()
            w = len(rows) / n_rows   # gradient accumulation: micro-batch losses weighted by their share
            ((tl + il) * w).backward()
            if it == cfg["num_iterations"] - 1:   # report the last pass (where clipping can be active)
                with torch.no_grad():   # log pi(v+) of the trained rows, over the same candidates
                    top = a.view(-1, G).argmax(1) + torch.arange(0, len(rows), G, device=dev)
                    is_["item_logp"] = recpo.item_logprobs(h_i, item_emb, t_i, cfg["tau"], mode, r.table.E,
                                                           excl, top, impl=cfg["kernels"]).mean().item()
                for k, v in {**ts, **is_}.items():
                    stats[k] = stats.get(k, 0.0) + v * (1 if k == "num_tokens" else w)
        gn = torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"] if cfg["max_grad_norm"] > 0 else 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
    stats["grad_norm"] = float(gn)
    return stats


def log_record(step, batch, stats, cfg, lr, dt):
    rw, adv, ro = batch["rw"], batch["adv"], batch["ro"]
    n_comp = ro["sampled_mask"].sum(1).float()                                        # [B*G] sampled tokens
    return {"step": step, "reward": rw["reward"].mean().item(), "reward_std": rw["reward"].std().item(),
            "r_d": rw["r_d"].mean().item(), "r_c": rw["r_c"].mean().item(),
            "rank_median": rw["rank"].float().median().item(), "frac_reward_zero_std": batch["frac0"],
            "adv_mean": adv.mean().item(), "adv_std": adv.std().item() if adv.numel() > 1 else 0.0,
            "adv_absmax": adv.abs().max().item(),
            **{k: stats[k] for k in ("token_loss", "item_loss", "clip_low", "clip_high", "item_clip_low",
                                     "item_clip_high", "item_logp", "grad_norm") if k in stats},
            "kl": stats.get("kl"), "entropy": stats.get("entropy"),
            "completion_len_mean": n_comp.mean().item(), "completion_len_max": int(n_comp.max().item()),
            "frac_cut": ro["cut"].float().mean().item(), "lr": lr, "step_s": dt, "gen_s": batch["t_gen"],
            "tokens_per_s": int(ro["attention_mask"].sum()) * cfg["num_iterations"] / max(dt, 1e-9)}


def train(cfg):
    t_start = time.time()
    budget = cfg["time_budget"] * 60
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    random.seed(cfg["seed"])
    ds = data.load_dataset(cfg["dataset"], data_dir=cfg["data_dir"], history=cfg["history"],
                           **({"num_users": cfg["synthetic_users"], "num_items": cfg["synthetic_items"]}
                              if cfg["dataset"] == "synthetic" else {}))
    r, params, extra = build(cfg, ds, verbose=not cfg["quiet"])
    opt = torch.optim.AdamW(param_groups(r, params, cfg), lr=cfg["lr"], betas=(0.9, 0.99),
                            weight_decay=cfg["weight_decay"])
    ref = None
    if cfg["kl_beta"] > 0:   # frozen copy of the starting policy
        ref = M.R2ec(copy.deepcopy(r.model).eval().requires_grad_(False), r.tok, None, cfg["tau"],
                     r.max_prompt_len, cfg["kernels"])
    state = {"best": -1.0, "best_step": -1, "bad_evals": 0, "evals": []}
    step = 0
    if extra is not None:   # resume: optimizer, RNG, counters; the item table came with the weights
        opt.load_state_dict(extra["optimizer"])
        set_rng_state(extra["rng"])
        step = extra["step"]
        state = {k: extra[k] for k in state}
    os.makedirs(cfg["out"], exist_ok=True)
    log_path = os.path.join(cfg["out"], "log.jsonl")
    logf = open(log_path, "a")

    def log(rec, line=None):
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        if line:
            tqdm.write(line)

    print("config:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(cfg.items())))
    val = ds.valid
    val_idx = np.arange(len(val)) if not cfg["val_samples"] or cfg["val_samples"] >= len(val) else \
        np.sort(np.random.default_rng(cfg["seed"]).choice(len(val), cfg["val_samples"], replace=False))
    val_header = ev.protocol_header(ds, "valid")
    if len(val_idx) < len(val):   # say so in the header itself: these numbers are not over every sample
        val_header = val_header.replace(f"({len(val):,} samples, all of them, no user cap)",
                                        f"(fixed subset: {len(val_idx):,} of {len(val):,} samples, seed {cfg['seed']})")
    print(val_header)
    if len(val_idx) < len(val):
        print(f"[eval] model selection uses a fixed subset of valid: {len(val_idx):,} of {len(val):,} samples "
              f"(seed {cfg['seed']}); the final test pass uses every test sample")
    pop_val = ev.format_table({"popularity (valid subset)": _popularity(ds, "valid", val_idx)})
    print(pop_val)
    log({"config": cfg, "protocol_valid": val_header, "val_samples": len(val_idx)})

    def run_eval(step):
        t0 = time.time()
        refresh_items(r, cfg["item_batch_size"])
        t_ref = time.time() - t0
        m, tm = evaluate_model(r, ds, "valid", cfg, val_idx, verbose=not cfg["quiet"])
        rec = {"step": step, **{f"val/{k}": v for k, v in m.items()}, "eval_s": time.time() - t0,
               "refresh_s": t_ref, **{f"eval_{k}": v for k, v in tm.items()}}
        state["evals"].append(rec)
        better = m["ndcg@10"] > state["best"]
        if better:
            state.update(best=m["ndcg@10"], best_step=step, bad_evals=0)
        else:
            state["bad_evals"] += 1
        log(rec, f"eval step {step}: " + " ".join(f"val/{k} {v:.4f}" for k, v in m.items())
            + f" | {time.time() - t0:.0f}s" + (" | new best" if better else ""))
        if better:
            save(os.path.join(cfg["out"], "best"), r, cfg, opt, step, state)
        save(os.path.join(cfg["out"], "last"), r, cfg, opt, step, state)
        return rec

    # cost model for --time-budget: the final test pass ~ measured eval seconds per user x test size
    def final_cost():
        ev_ = [e for e in state["evals"] if "eval_n" in e]
        per_user = ev_[-1]["eval_s"] / ev_[-1]["eval_n"] if ev_ else 0.0
        return 0 if cfg["no_test"] else 1.15 * per_user * len(ds.test) + 15

    if not r.table.fresh:
        refresh_items(r, cfg["item_batch_size"])
    if step == 0 and extra is None and cfg["eval_every"] > 0:
        run_eval(0)   # the untrained model: a reference point, and the timing the budget needs
    step_times, stop, records = [], None, []
    # under a time budget the step count is unknown: no total, so tqdm shows no misleading ETA
    bar = tqdm(total=None if budget > 0 else cfg["max_steps"], initial=step, desc="RecPO", disable=cfg["quiet"],
               unit="step")
    while step < cfg["max_steps"]:
        if budget:
            est = (np.mean(step_times[-10:]) if step_times else 0) + final_cost()
            if time.time() - t_start + est > budget:
                stop = f"time budget ({cfg['time_budget']:g} min; final test pass reserved)"
                break
        t0 = time.time()
        if step and step % cfg["item_refresh"] == 0:
            refresh_items(r, cfg["item_batch_size"])
        lr = lr_at(step, cfg)
        batch = rollout_step(r, ds, cfg, step, ref)
        stats = update_step(r, cfg, batch, opt, params, lr)
        step += 1
        dt = time.time() - t0
        step_times.append(dt)
        rec = log_record(step, batch, stats, cfg, lr, dt)
        records.append(rec)
        bar.update(1)
        bar.set_postfix(reward=f"{rec['reward']:.3f}", loss=f"{rec['token_loss'] + rec['item_loss']:.3f}")
        if step % cfg["log_every"] == 0 or step == 1:
            log(rec, f"step {step} | reward {rec['reward']:.4f} (R_d {rec['r_d']:.4f} R_c {rec['r_c']:.5f}) "
                f"zero-std {rec['frac_reward_zero_std']:.2f} | adv |max| {rec['adv_absmax']:.2f} | "
                f"tok_loss {rec['token_loss']:.4f} item_loss {rec['item_loss']:.4f}"
                + (f" kl {rec['kl']:.4f}" if rec["kl"] is not None else "")
                + f" | clip {rec['clip_low']:.3f}/{rec['clip_high']:.3f} | ent {rec['entropy'] or 0:.2f} | "
                f"len {rec['completion_len_mean']:.1f}/{rec['completion_len_max']} cut {rec['frac_cut']:.2f} | "
                f"gnorm {rec['grad_norm']:.3f} | lr {lr:.2e} | {dt:.2f}s/step {rec['tokens_per_s']:.0f} tok/s")
        if cfg["eval_every"] > 0 and step % cfg["eval_every"] == 0:
            run_eval(step)
            if cfg["patience"] and state["bad_evals"] >= cfg["patience"]:
                stop = f"early stopping: {cfg['patience']} evaluations without a better valid NDCG@10"
                break
    bar.close()
    last_eval = state["evals"][-1]["step"] if state["evals"] else -1
    if last_eval != step and cfg["eval_every"] > 0:
        ev_cost = state["evals"][-1]["eval_s"] if state["evals"] else 0
        if not budget or time.time() - t_start + ev_cost + final_cost() < budget:
            run_eval(step)
    if not state["evals"]:   # no evaluation at all: the last model is the best one
        refresh_items(r, cfg["item_batch_size"])
        save(os.path.join(cfg["out"], "best"), r, cfg, opt, step, state)
        save(os.path.join(cfg["out"], "last"), r, cfg, opt, step, state)
    print(f"stopped at step {step}: {stop or 'max steps'} | best valid NDCG@10 {state['best']:.4f} at step "
          f"{state['best_step']} | {time.time() - t_start:.0f}s so far")
    result = {"best_step": state["best_step"], "best_val_ndcg@10": state["best"], "steps": step,
              "evals": state["evals"]}
    if not cfg["no_test"]:
        rb, _ = load_for_eval(os.path.join(cfg["out"], "best"), cfg["device"], ds)
        print(ev.protocol_header(ds, "test"))
        m, tm = evaluate_model(rb, ds, "test", cfg, verbose=not cfg["quiet"])
        rows = {f"R2ec (best, step {state['best_step']})": m, **baseline_rows(ds, "test")}
        table = ev.format_table(rows)
        print(table)
        print(latency_line(tm))
        result.update(test=m, table=table, test_timing=tm)
        log({"test": m, "best_step": state["best_step"], "baselines": rows})
    result["seconds"] = time.time() - t_start
    with open(os.path.join(cfg["out"], "results.json.tmp"), "w") as f:
        json.dump(result, f, indent=1)
    os.replace(os.path.join(cfg["out"], "results.json.tmp"), os.path.join(cfg["out"], "results.json"))
    print(f"done in {result['seconds']:.0f}s -> {cfg['out']}")
    logf.close()
    result["log"] = records
    return result


def _popularity(ds, split_name, idx):
    import baselines
    return baselines.evaluate_popularity(subset_view(ds, split_name, idx), split_name, verbose=False, header=False)


def main(argv=None):
    try:
        cfg = resolve_config(argv)
        train(cfg)
    except (TrainError, data.DataError, M.ModelError, ev.EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
