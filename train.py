"""Train R²ec with RecPO (arXiv 2505.16994, §3.2), one plain loop, top to bottom.

    python train.py --dataset ml-100k                 # preset cpu: tiny backbone, <= 10 min, test table at the end
    python train.py --init-from ~/models/Qwen2.5-3B-Instruct --dataset amazon-2023:Video_Games --data-dir ~/amazon
    python train.py --resume out/ml-100k/last          # continue exactly where a run stopped

Stages, like nanochat's base -> RL: a from-scratch tiny backbone learns the data's language from the TRAIN split
(model.lm_stage: R²ec prompts, then the next item's text; --pretrain-steps), then RecPO. This file is the loop: config
(presets `paper`, the CUDA default, and `cpu`, the 10-minute demo; validation; resume), build, rollout() and update()
of one RL step, evaluation, checkpoints, log, the test table. Model operations: model.py; objective: recpo.py."""
import argparse
import copy
import json
import math
import os
import random
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import eval as ev
import model as M
import recpo

PRESETS = {
    "paper": dict(prompt_history=20, max_new_tokens=640, val_samples=0, train_recent=0, item_loss="inbatch",
                  micro_batch_size=4, embed_lr_mult=1.0, time_budget=0.0, pretrain_steps=0, temperature=2.0, kl_beta=0.0),
    "cpu": dict(prompt_history=8, max_new_tokens=32, val_samples=1000, train_recent=10000, item_loss="sampled",
                micro_batch_size=32, embed_lr_mult=0.1, time_budget=10.0, pretrain_steps=2000, temperature=1.0,
                kl_beta=0.1, pretrain_item_weight=1.0, item_weighting="uniform", relabel_topk=0, cut_penalty=0.1,
                greedy_chain=True, pretrain_prompt_weight=0.25, pretrain_line_weight=1.0, item_tokens=True,
                num_generations=2),
}
LR = {"tiny": 2e-3, "hf": 1e-5}   # --lr default by backbone [paper: 1e-5]
# what a resumed run may not change: it defines the data, the model or the meaning of a step
FIXED_ON_RESUME = ("dataset", "history", "synthetic_users", "synthetic_items", "init_from", "tiny_layers", "tiny_hidden",
                   "tiny_heads", "lora_r", "lora_alpha", "tau", "num_generations", "batch_size", "seed", "prompt_history",
                   "max_prompt_len", "no_reasoning", "item_loss")   # (item tokens: the checkpoint's tokenizer has them or not)
OPTIONAL_SAVED = ("resume", "preset", "data_dir", "max_prompt_len", "pretrain_steps", "logp_temperature")
MAX_BAD_STEPS = 5   # non-finite loss/grad steps in a row before the run stops
TRAIN_SHARE = 0.6   # of --time-budget, guaranteed to training whatever the test pass is estimated to cost
TrainError = data.UserError   # user-facing: main() prints `error: <msg>` and exits 2


# ----------------------------------------------------------------------------------------------------------
# config: defaults here, preset values in PRESETS, explicit flags win

def get_parser():
    p = data.CLIParser(description="Train R²ec with RecPO; --preset paper (CUDA default) or cpu (10-minute demo).")
    I, I0, F, F0, U = data.pos_int, data.nonneg_int, data.pos_float, data.nonneg_float, data.unit_float
    a = p.add_argument
    a("--preset", choices=tuple(PRESETS), help="paper values, or the CPU demo's (default: paper on CUDA, else cpu)")
    # data
    a("--dataset", default="ml-100k", help="ml-100k | synthetic | amazon-2023:<Category> | csv:<dir> (see data.py)")
    a("--data-dir", help="folder with the raw dataset files (data.py's default if unset)")
    a("--history", type=I, default=20, help="history window H of the samples [paper: 20]")
    a("--prompt-history", type=I, help="most recent history items in the prompt (all H masked) [paper: 20; cpu: 8]")
    a("--max-prompt-len", type=I, help="prompt token cap, oldest history lines dropped (default: from the context)")
    a("--train-recent", type=I0, help="users from the last N train samples, 0 = all [paper: 0; cpu: 10000]")
    a("--synthetic-users", type=I, default=600, help="synthetic dataset: number of users")
    a("--synthetic-items", type=I, default=400, help="synthetic dataset: number of items")
    # model
    a("--init-from", default="tiny", help="'tiny' (built-in, tokenizer trained on the data) | local HF dir | .gguf")
    a("--tiny-layers", type=I, default=2, help="tiny backbone: transformer layers")
    a("--tiny-hidden", type=I, default=128, help="tiny backbone: hidden size (a multiple of --tiny-heads)")
    a("--tiny-heads", type=I, default=4, help="tiny backbone: attention heads")
    a("--item-tokens", action=argparse.BooleanOptionalAction, default=False, help="tiny: a token per item [cpu: yes]")
    a("--lora-r", type=I0, default=4, help="LoRA rank, Hugging Face backbones [paper: 4]; 0 = full fine-tuning")
    a("--lora-alpha", type=F, default=128.0, help="LoRA alpha [paper: 128]")
    a("--lora-dropout", type=U, default=0.0, help="LoRA dropout")
    a("--tau", type=F, default=0.02, help="cosine temperature of the item head, s = cos/tau [paper: 0.02]")
    a("--pretrain-steps", type=I0, help="LM-stage steps, 0 = skip [paper: 0; cpu: 2000, <= --pretrain-share]")
    a("--pretrain-lr", type=F, default=3e-3, help="LM stage: AdamW peak LR")
    a("--pretrain-item-weight", type=F0, default=0.0, help="LM stage: + w x item loss w/o reasoning [cpu: 1]")
    a("--pretrain-item-form", default="prompt", choices=("prompt", "reasoning"), help="... or after greedy reasoning")
    a("--pretrain-line-weight", type=F0, default=0.0, help="... + w x item loss at each history line's end [cpu: 1]")
    a("--pretrain-prompt-weight", type=F0, default=1.0, help="LM stage: prompt tokens' weight, the reply's 1 [cpu: 0.25]")
    a("--pretrain-share", type=U, default=0.35, help="LM stage: the most of --time-budget it may take")
    a("--ptx-coef", type=F0, default=0.0, help="RecPO: + c x the LM stage's loss on its next batch (PPO-ptx)")
    a("--item-warmup", type=I0, default=0, help="first N RecPO steps w/o reasoning (G = 1, item loss only)")
    # rollouts
    a("--num-generations", type=I, default=4, help="reasoning chains per user, G >= 2 [paper: 4; cpu: 2]")
    a("--temperature", type=F, help="sampling temperature of rollouts [paper: 2.0; cpu: 1.0]")
    a("--top-k", type=I0, default=50, help="top-k sampling of rollouts, 0 = off [paper: 50]")
    a("--greedy-chain", action=argparse.BooleanOptionalAction, default=False, help="chain 0 of a group greedy [cpu: yes]")
    a("--logp-temperature", type=F, help="temperature of the token log-probs in the loss (and of the KL) [paper's "
      "reference code, as TRL: = --temperature, the default]; ratio and clipping use the same one")
    a("--max-new-tokens", type=I0, help="reasoning token limit, train and eval [paper: 640; cpu: 32]")
    a("--no-reasoning", action="store_true", help="ablation 'w/o reasoning': anchor right after prompt")
    # reward and objective (recpo.py)
    a("--reward", default="mix", choices=recpo.REWARD_KINDS, help="ndcg: R_d, softmax: R_c, mix [paper: mix]")
    a("--reward-k", type=I, default=1000, help="R_d = 1/log2(r+2) if rank r < k else 0 [paper: 1000]")
    a("--reward-beta", type=U, default=0.05, help="mix: (1 - beta) R_d + beta R_c [paper: 0.05]")
    a("--cut-penalty", type=F0, default=0.0, help="reward - p for a chain cut at the cap before <answer> [paper: 0]")
    a("--advantage", default="gaussian", choices=recpo.ADVANTAGE_KINDS, help="z-score in the group [paper] or loo")
    a("--loss-type", default="token-mean", choices=recpo.LOSS_TYPES, help="token loss aggregation [paper: token-mean]")
    a("--clip-low", type=U, default=0.2, help="PPO clip epsilon below 1 [paper: 0.2]")
    a("--clip-high", type=F0, default=0.28, help="PPO clip epsilon above 1 [paper: 0.28]")
    a("--item-loss", choices=recpo.ITEM_LOSS_MODES, help="item softmax over: the batch's targets [paper: inbatch], "
      "+ uniform negatives [cpu: sampled], or the cached table (full)")
    a("--item-negatives", type=I, default=128, help="sampled item loss: uniform items per step, encoded with grad")
    a("--relabel-topk", type=I0, default=1, help="item loss on the top-k chains per group, 0 = all [paper: 1; its script: 2]")
    a("--item-weighting", default="advantage", choices=("advantage", "uniform"), help="x A / B [paper] or CE (recpo.py 12.)")
    a("--kl-beta", type=F0, help="k3 KL to a frozen copy of the model RecPO starts (or resumes) from [paper: 0; cpu: 0.1]")
    a("--reference-broadcast", action="store_true", help="ablation: the reference code's defect (recpo.py, 1.)")
    # optimization
    a("--batch-size", type=I, default=32, help="training users per step (each with G rollouts)")
    a("--micro-batch-size", type=I, help="users per forward/backward [paper setup: 4; cpu: = --batch-size]")
    a("--gradient-checkpointing", action="store_true", help="recompute activations in backward (large backbones)")
    a("--num-iterations", type=I, default=1, help="optimizer passes over each rollout batch [paper: 1]")
    a("--lr", type=F, help=f"AdamW peak learning rate [paper: 1e-5; tiny backbone default: {LR['tiny']}]")
    a("--weight-decay", type=F0, default=0.0, help="AdamW weight decay")
    a("--embed-lr-mult", type=F0, help="LR multiplier of a trained tied embedding / LM head [paper: 1; cpu: 0.1]")
    a("--warmup-steps", type=I0, default=10, help="linear LR warmup steps")
    a("--min-lr-frac", type=U, default=0.1, help="cosine floor as a fraction of --lr (1 = constant LR)")
    a("--max-grad-norm", type=F0, default=1.0, help="gradient clipping norm (0 = off)")
    a("--max-steps", type=I, default=2000, help="training steps (RL steps: rollouts + update)")
    a("--time-budget", type=F0, help="minutes for the run, final test reserved, 0 = off [paper: 0; cpu: 10]")
    # item table, evaluation, output
    a("--item-refresh", type=I, default=20, help="re-encode the full item table every N steps (and before eval)")
    a("--item-batch-size", type=I, default=256, help="batch size of item table encoding")
    a("--eval-every", type=I0, default=100, help="evaluate on valid every N steps (0: only at the end)")
    a("--val-samples", type=lambda t: 0 if t == "all" else I0(t), help="valid subset for selection [paper: all; cpu: 1000]")
    a("--eval-batch-size", type=I, default=256, help="users per greedy-reasoning batch at evaluation")
    a("--patience", type=I0, default=5, help="stop after N evaluations without a better valid NDCG@10 (0 = never)")
    a("--no-test", action="store_true", help="skip the final test evaluation")
    a("--test-samples", type=I0, default=0, help="final test on a fixed seeded subset (said in the header), 0 = all")
    a("--log-every", type=I, default=5, help="one log line + one log.jsonl record every N steps")
    a("--out", help="output folder (default out/<dataset-slug>): best/, last/, log.jsonl, results.json")
    a("--resume", help="checkpoint folder (e.g. out/ml-100k/last) to continue exactly; explicit flags override")
    a("--device", default="auto", help="auto (CUDA if available, else CPU) | cpu | cuda[:i]")
    a("--kernels", default="auto", choices=("auto", "triton", "torch", "chunked", "reference"), help="impl= of both kernels")
    a("--seed", type=I0, default=0, help="seed of init, user sampling and rollouts")
    a("--quiet", action="store_true", help="no progress bars")
    a("--report-to", default="none", choices=data.REPORTERS, help="also log to tensorboard or wandb (optional packages)")
    return p


def resolve_config(argv=None):
    """Flags -> config dict: defaults, then the preset, then explicit flags; --resume: saved config +
    explicit flags. Everything is checked here, before anything is created."""
    p, unset = get_parser(), object()
    args = p.parse_args(argv)
    # argparse fills only attributes the namespace lacks: a pre-filled sentinel marks the flags not given
    seen = vars(p.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in vars(args)})))
    given = {k: v for k, v in seen.items() if v is not unset}
    if args.resume:
        saved = M.read_run_config(args.resume, "--resume")
        d = vars(p.parse_args([]))   # what defines a run must be saved; a flag newer than the checkpoint: default
        need = [k for k in d if k in FIXED_ON_RESUME or d[k] is None and k not in OPTIONAL_SAVED]
        saved = {**vars(args), **p.parse_saved(saved, os.path.join(args.resume, "run_config.json"), need)}
        changed = [k for k in FIXED_ON_RESUME if k in given and given[k] != saved.get(k)]
        if changed:
            raise TrainError(f"--resume {args.resume}: --{changed[0].replace('_', '-')} cannot change in a resumed "
                             f"run (saved {saved.get(changed[0])!r}); start a new run instead")
        M.load_train_state(args.resume, mmap=True)   # refused now (pickle, truncation), not after the data is built
        return validate({**saved, **given, "resume": args.resume})
    preset = args.preset or ("paper" if ev.pick_device(args.device).startswith("cuda") else "cpu")
    cfg = {**vars(args), **PRESETS[preset], **given, "preset": preset}
    cfg["lr"] = cfg["lr"] or LR["tiny" if cfg["init_from"] == "tiny" else "hf"]
    cfg["logp_temperature"] = cfg["logp_temperature"] or cfg["temperature"]
    cfg.update({k: type(cfg[k])() for k in ("pretrain_steps", "item_tokens") if cfg["init_from"] != "tiny" and k not in given})
    cfg["out"] = cfg["out"] or os.path.join("out", data.slug(cfg["dataset"]))
    return validate(cfg)


def validate(cfg):
    """Cross-flag checks (single flags are range-checked by their argparse types)."""
    cfg["device"] = ev.pick_device(cfg["device"])
    cfg["micro_batch_size"] = min(cfg["micro_batch_size"], max(1, cfg["batch_size"] // data.world()))   # per process
    cfg["quiet"] = cfg["quiet"] or not data.is_main()   # torchrun: rank 0 alone prints and draws progress bars
    ev.check_kernels(cfg["kernels"], cfg["device"])
    data.check_out_dir(cfg["out"], "--out")   # a file, or a file on the way: refused before anything is built
    data.reporter(cfg.get("report_to", "none"))   # its optional package, checked now
    M.check_init_from(cfg["init_from"], cfg)   # and the tiny backbone's shape, before anything is built
    checks = [(cfg["batch_size"] % (data.world() * cfg["micro_batch_size"]) == 0,   # torchrun: B/N users per process
               f"--batch-size {cfg['batch_size']} must be a multiple of --micro-batch-size {cfg['micro_batch_size']}"
               + (f" x {data.world()} processes" if data.world() > 1 else "")),
              (not (cfg["reference_broadcast"] and cfg["item_loss"] == "sampled"),
               "--reference-broadcast reproduces the reference's in-batch/full item loss; use --item-loss inbatch"),
              (cfg["num_generations"] >= 2, "--num-generations must be >= 2: advantages are relative within a group"),
              (cfg["relabel_topk"] <= cfg["num_generations"], "--relabel-topk must be <= --num-generations")]
    if not all(ok for ok, _ in checks):
        raise TrainError(next(msg for ok, msg in checks if not ok))
    return cfg


# ----------------------------------------------------------------------------------------------------------
# one RL step: rollout() then update()

def lr_at(step, cfg, horizon=None):
    """Linear warmup, then cosine to min_lr_frac * lr over --max-steps, or over the steps the time budget allows
    (`horizon`, estimated after 10 steps)."""
    lr, w = cfg["lr"], cfg["warmup_steps"]
    if step < w:
        return lr * (step + 1) / w
    t = min(1.0, (step - w) / max(1, (horizon or cfg["max_steps"]) - w))
    return lr * (cfg["min_lr_frac"] + (1 - cfg["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))


def rollout(r, ds, cfg, step, ref=None, ph=None):
    """Users -> G chains each with h_T (one cached pass) -> rewards over the full catalog -> advantages.
    Returns a batch dict; chunks[i] = the i-th micro-batch of rollout rows, trimmed of all-padding columns."""
    ph, _ = ph or M.Phases(), M.fit_threads(r.device)   # CPU: threads = the cores other processes leave free
    tr, B, mine = ds.train, cfg["batch_size"], data.rank_slice(cfg["batch_size"])   # torchrun: users [mine] of B
    G = 1 if cfg["no_reasoning"] else cfg["num_generations"]   # w/o reasoning: the G chains would be equal
    pool = np.arange(len(tr))[-cfg["train_recent"]:] if cfg["train_recent"] else np.arange(len(tr))
    idx = pool[data.train_indices(step, B, len(pool), cfg["seed"])][mine]          # [b]: B, or B / processes
    targets = torch.from_numpy(np.repeat(tr.target[idx], G)).to(r.device)             # [b*G]
    hist = torch.from_numpy(np.repeat(tr.hist[idx], G, axis=0)).to(r.device)          # [b*G, H]
    neg = None if cfg["item_loss"] != "sampled" else torch.from_numpy(np.sort(np.random.default_rng([cfg["seed"], step, 1])
        .choice(ds.num_items, min(cfg["item_negatives"], ds.num_items), replace=False) + 1)).to(r.device)   # uniform
    r.model.eval()
    with ph("rollout"), torch.no_grad(), M.autocast(r.device):
        # a chain's noise: (seed, step, its user's position in the step); resumed and torchrun runs sample the same
        ro, h_T = r.decode(r.split_prompt_ids(tr, idx, cfg["prompt_history"]), G, greedy=False,
                           temperature=cfg["temperature"], top_k=cfg["top_k"],
                           max_new_tokens=0 if cfg["no_reasoning"] else cfg["max_new_tokens"],
                           seed=(cfg["seed"], step), first=mine.start, greedy_first=cfg["greedy_chain"])   # [b*G, d]
        mb, n = cfg["micro_batch_size"] * G, len(idx) * G
        chunks = [M.slice_rollout(ro, torch.arange(s, min(s + mb, n), device=r.device)) for s in range(0, n, mb)]
        for c in chunks if ref is not None else []:   # frozen initial model, for the k3 KL
            c["ref_logp"] = ref.forward_both(c, G, cfg["logp_temperature"])[0]
    r.model.train()
    with ph("reward"):
        rw = recpo.compute_rewards(h_T, r.table.E, targets, hist, cfg["tau"], cfg["reward_k"], cfg["reward_beta"],
                                   cfg["reward"], impl=cfg["kernels"])
        rw["reward"] = rw["reward"] - cfg["cut_penalty"] * ro["cut"].float() * (G > 1)   # a format reward (README)
        adv, frac0 = recpo.compute_advantages(rw["reward"], G, cfg["advantage"])       # [b*G]
    step_rows = (*data.all_gather((rw, adv)), data.all_reduce({"f": frac0})["f"] / data.world(),   # for the log: all
                 data.all_gather({k: ro[k] for k in ("sampled_mask", "attention_mask", "cut")}))   # processes' rows
    return dict(idx=idx, ro=ro, G=G, targets=targets, hist=hist, rw=rw, adv=adv, frac0=frac0, chunks=chunks,
                neg=neg, step_rows=step_rows, split=tr, ptx_step=cfg["pretrain_steps"] + step)   # ptx: the stage's next


def update(r, cfg, batch, opt, params, lr, ph=None):
    """--num-iterations optimizer steps over the rollout batch: per micro-batch forward_both -> token_loss +
    item_loss -> backward; then clip and AdamW. pi_old is the first pass's own log-probs (detached), so the
    ratio is exactly 1 on the first pass. A non-finite loss or gradient skips the optimizer step. The table rows
    re-encoded in a pass are written after it (a micro-batch's loss never depends on another's writes)."""
    ph = ph or M.Phases()
    G, adv, n_rows = batch["G"], batch["adv"], batch["targets"].shape[0] * data.world()   # rows of the GLOBAL batch
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    stats, old = {}, {}
    for it in range(cfg["num_iterations"]):
        writes = []
        for ci, c in enumerate(batch["chunks"]):
            tgt, a, excl = batch["targets"][c["rows"]], adv[c["rows"]], batch["hist"][c["rows"]]   # [b] [b] [b,H]
            uniq, inv = torch.unique(tgt, return_inverse=True)
            ids = uniq if batch["neg"] is None else torch.cat([uniq, batch["neg"]])            # [u (+S)]
            with ph("forward (tokens)"), M.autocast(r.device):
                logp, h_T, ent = r.forward_both(c, G, cfg["logp_temperature"], return_entropy=True)  # [b, C], [b, d]
            with ph("item encoding"), M.autocast(r.device):
                emb = r.encode_items(ids.tolist(), grad=True, batch_size=cfg["item_batch_size"])  # [u(+S), d]
            writes.append((ids, emb.detach()))
            neg = None if batch["neg"] is None else (ids[len(uniq):], emb[len(uniq):])
            kw = dict(tau=cfg["tau"], mode=cfg["item_loss"], E=r.table.E, exclude=excl, impl=cfg["kernels"], negatives=neg)
            with ph("losses"):
                if cfg["num_iterations"] > 1 and it == 0:   # pi_old on the update's own numerical path
                    with torch.no_grad():
                        old[ci] = (logp.detach(), recpo.item_logprobs(h_T, emb[inv], tgt, **kw))
                P = c["prompt_len"]
                tl, ts = recpo.token_loss(logp, old[ci][0] if old else None, a, c["sampled_mask"][:, P:],
                                          cfg["clip_low"], cfg["clip_high"], cfg["loss_type"], cfg["max_new_tokens"],
                                          c.get("ref_logp"), cfg["kl_beta"], cfg["reference_broadcast"], ent)
                il, is_ = recpo.item_loss(h_T, emb[inv], tgt, a, old[ci][1] if old else None, G, cfg["relabel_topk"],
                                          eps_low=cfg["clip_low"], eps_high=cfg["clip_high"], weighting=cfg["item_weighting"],
                                          reference_broadcast=cfg["reference_broadcast"], **kw)
            w = len(c["rows"]) / n_rows   # gradient accumulation: micro-batch losses weighted by their share
            with ph("backward"):
                ((tl + il) * w).backward()
            if it == cfg["num_iterations"] - 1:   # report the last pass (where clipping can be active)
                for k, v in {**ts, **is_}.items():
                    stats[k] = stats.get(k, 0.0) + v * (1 if k == "num_tokens" else w)
        if cfg["ptx_coef"] and it == 0:   # + the LM stage's loss on its next batch, once per rollout batch
            with ph("ptx"), M.autocast(r.device):
                (cfg["ptx_coef"] / data.world() * M.stage_loss(r, batch["split"], cfg, batch["ptx_step"])[0]).backward()
        with ph("optimizer"):
            # torchrun: all processes' table writes (single-process order); grads and stats summed (global weights)
            r.table.update(*(data.all_gather(torch.cat(x)) for x in zip(*writes)))
            data.all_reduce_grads(params)
            stats = data.all_reduce(stats)
            gn = float(torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"] or float("inf")))
            finite = math.isfinite(gn) and all(math.isfinite(stats.get(k, 0.0)) for k in ("token_loss", "item_loss"))
            if finite:
                opt.step()
            opt.zero_grad(set_to_none=True)
    return {**stats, "grad_norm": gn, "skipped": not finite}


# ----------------------------------------------------------------------------------------------------------
# build, save, resume

def build(cfg, ds, verbose=True):
    """-> (R2ec, trainable params, train_state or None): fresh from --init-from, or from --resume."""
    res, lora_r = cfg.get("resume"), 0 if cfg["init_from"] == "tiny" else cfg["lora_r"]
    if res and lora_r == 0:   # the checkpoint holds every weight: load it as is
        model, tok = M.build_backbone(res, None, device=cfg["device"], verbose=False,
                                      dtype=torch.float32 if cfg["init_from"] == "tiny" else None)
    else:
        model, tok = data.main_first(M.build_backbone, cfg["init_from"], ds, tiny_cfg=M.tiny_config(cfg),
                                     device=cfg["device"], verbose=verbose)   # rank 0 first: it caches the tokenizer
    params = M.apply_lora(model, lora_r, cfg["lora_alpha"], cfg["lora_dropout"])
    if res and lora_r > 0:   # base weights from --init-from + the saved adapter
        M.load_lora_state(model, os.path.join(res, "adapter.safetensors"))
    r = M.R2ec(model, tok, ds, tau=cfg["tau"], max_prompt_len=cfg["max_prompt_len"], impl=cfg["kernels"])
    if cfg.get("gradient_checkpointing"):   # after apply_lora: frozen embeddings then need input grads
        r.enable_gradient_checkpointing()
    r.split_prompt_ids(ds.train, [0], cfg["prompt_history"])   # a --max-prompt-len too small fails here, early
    if res:   # the item table as saved (the checkpoint's item map is checked against the dataset)
        M.read_item_map(res, ds)
        r.table = M.load_item_table(res, ds.num_items, r.table.E.shape[1], r.device)
    else:
        r.refresh_items(cfg["item_batch_size"])
    model.train()
    return r, params, M.load_train_state(res) if res else None


def optimizer(r, params, cfg, saved):
    """AdamW -> (opt, state, step); resuming: with the saved optimizer, RNG and counters."""
    opt = torch.optim.AdamW(M.param_groups(r, params, cfg["embed_lr_mult"]), lr=cfg["lr"], betas=(0.9, 0.99),
                            weight_decay=cfg["weight_decay"])
    state = {"best": -1.0, "best_step": -1, "bad_evals": 0, "evals": [], "skipped": 0}
    if saved is None:
        return opt, state, 0
    opt.load_state_dict(saved["optimizer"]), M.set_rng_state(saved["rng"])
    return opt, {**state, **saved["state"]}, saved["step"]


def save(name, r, cfg, opt, step, state):
    """A checkpoint out/<run>/<name>: weights, table, config, item map; optimizer + RNG + counters to resume."""
    st = {"step": step, "optimizer": opt.state_dict(), "rng": M.rng_state(), "state": state}
    M.save_checkpoint(os.path.join(cfg["out"], name), r, {**cfg, "max_prompt_len": r.max_prompt_len}, st)


# ----------------------------------------------------------------------------------------------------------
# the loop

def train(cfg):
    t_start, budget = time.time(), cfg["time_budget"] * 60
    random.seed(cfg["seed"]), np.random.seed(cfg["seed"]), torch.manual_seed(cfg["seed"])
    ds = data.load_for_run(cfg, verbose=not cfg["quiet"])
    r, params, saved = build(cfg, ds, verbose=not cfg["quiet"])
    opt, state, step = optimizer(r, params, cfg, saved)
    log = data.jsonl_logger(os.path.join(cfg["out"], "log.jsonl"), cfg.get("report_to", "none"))
    M.clean_checkpoints(cfg["out"])
    print(f"preset {cfg['preset']} | config:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(cfg.items())))
    if saved is None and cfg["pretrain_steps"]:   # stage 1, the LM stage (train split only); then RecPO
        state["pretrain"] = M.lm_stage(r, params, ds.train, cfg, cfg["pretrain_share"] * budget, log)
        log(state["pretrain"], "LM stage: {steps} steps, loss {loss:.3f}, {seconds:.0f}s".format(**state["pretrain"]))
        r.refresh_items(cfg["item_batch_size"])
    ref = None if not cfg["kl_beta"] else M.R2ec(copy.deepcopy(r.model).eval().requires_grad_(False), r.tok, None,
                                                 cfg["tau"], r.max_prompt_len, cfg["kernels"])   # after the LM stage
    val_idx = ev.valid_subset(ds, cfg["val_samples"], cfg["seed"])
    log({"config": cfg, "val_samples": len(val_idx)})
    if step == 0 and saved is None and cfg["eval_every"] > 0:
        run_eval(r, ds, cfg, val_idx, opt, step, state, log, params)   # untrained: reference point + timing
    times, stop, records, bad = [], None, [], 0
    last_eval = lambda: state["evals"][-1]["eval_s"] if state["evals"] else 0.0   # noqa: E731
    left = lambda: budget - time.time() + t_start - ev.final_cost(state, len(ds.test), cfg, TRAIN_SHARE) - last_eval()  # noqa
    bar = tqdm(total=None if budget else cfg["max_steps"], initial=step, desc="RecPO", disable=cfg["quiet"], unit="step")
    while step < cfg["max_steps"]:
        if budget and data.any_rank(max(times[-10:] or [0]) > left()):   # slowest recent step; any_rank: ranks stop together
            stop = f"time budget ({cfg['time_budget']:g} min; a last valid and the test pass reserved)"
            break
        t0, ph = time.time(), M.Phases(r.device.type == "cuda")
        if step and step % cfg["item_refresh"] == 0:
            r.refresh_items(cfg["item_batch_size"])
        if budget and len(times) >= 10 and step >= cfg["item_warmup"] + 10 and not state.get("horizon"):   # evals too
            per = np.mean(times[-10:]) + (last_eval() / cfg["eval_every"] if cfg["eval_every"] else 0)
            state["horizon"] = min(cfg["max_steps"], step + int(left() / per))
        c, lr = cfg if step >= cfg["item_warmup"] else {**cfg, "no_reasoning": True}, lr_at(step, cfg, state.get("horizon"))
        batch = rollout(r, ds, c, step, ref, ph)   # c: the item-head warm-up steps run without reasoning
        stats = update(r, c, batch, opt, params, lr, ph)
        step += 1
        times.append(time.time() - t0)
        rec = {"step": step, **recpo.step_metrics(*batch["step_rows"], stats), "learning_rate": lr, "step_s": times[-1],
               "phases_s": dict(ph.s),
               "tokens_per_s": int(batch["step_rows"][3]["attention_mask"].sum()) * cfg["num_iterations"] / times[-1]}
        records.append(rec)
        bar.update(1), bar.set_postfix(reward=f"{rec['reward']:.3f}", loss=f"{rec['token_loss'] + rec['item_loss']:.3f}")
        bad, state["skipped"] = (bad + 1, state["skipped"] + 1) if stats["skipped"] else (0, state["skipped"])
        if bad >= MAX_BAD_STEPS:
            raise TrainError(f"{bad} steps in a row with a non-finite loss or gradient (last: step {step}); "
                             "lower --lr or --max-grad-norm, or resume from the last checkpoint")
        if stats["skipped"] or step % cfg["log_every"] == 0 or step == 1:
            log(rec, f"step {step}: loss or gradient not finite: update skipped" if stats["skipped"] else recpo.format_metrics(rec))
        if cfg["eval_every"] and step % cfg["eval_every"] == 0:
            run_eval(r, ds, cfg, val_idx, opt, step, state, log, params)
            if cfg["patience"] and state["bad_evals"] >= cfg["patience"]:
                stop = f"early stopping: {cfg['patience']} evaluations without a better valid NDCG@10"
                break
    bar.close()
    if cfg["eval_every"] and (not state["evals"] or state["evals"][-1]["step"] != step) and not (budget and data.any_rank(left() < 0)):
        run_eval(r, ds, cfg, val_idx, opt, step, state, log, params)
    if not os.path.isdir(state.get("best_dir", "")):   # no evaluation: the last model is the best one
        r.refresh_items(cfg["item_batch_size"])
        state.update(best_dir=os.path.abspath(os.path.join(cfg["out"], "best")), best_step=step)
        save("best", r, cfg, opt, step, state)
    save("last", r, cfg, opt, step, state)
    print(f"stopped at step {step}: {stop or 'max steps'} | best valid NDCG@10 {state['best']:.4f} at step "
          f"{state['best_step']} | {state['skipped']} steps skipped (non-finite) | {time.time() - t_start:.0f}s so far")
    result = {"best_step": state["best_step"], "best_val_ndcg@10": state["best"], "steps": step, "evals": state["evals"]}
    if (b := state["best_step"]) == 0 or step < 2 * cfg["warmup_steps"]:   # with a stage: its model, or barely more
        print(f"warning: the best checkpoint is from RecPO step {b} of {step}: " + ("the LM stage's model, never beaten on "
              "valid" if "pretrain" in state and not b else "essentially untrained" + " by RecPO" * ("pretrain" in state))
              + "; the numbers below are not a RecPO-trained model's (a longer --time-budget or a less busy machine helps)")
    if not cfg["no_test"]:
        m, tm, rows = ev.evaluate_checkpoint(state["best_dir"], ds, "test", cfg["device"], cfg["eval_batch_size"],
                                             f"R2ec (best, step {state['best_step']})", not cfg["quiet"],
                                             samples=cfg.get("test_samples", 0), seed=cfg["seed"])
        log({"test": m, "best_step": state["best_step"], "baselines": rows})
        result.update(test=m, table=ev.format_table(rows), test_timing=tm)
    result["seconds"] = time.time() - t_start
    if data.is_main():
        data.atomic_write(os.path.join(cfg["out"], "results.json"), json.dumps(result, indent=1))
    print(f"done in {result['seconds']:.0f}s -> {cfg['out']}")
    return {**result, "log": records}


def run_eval(r, ds, cfg, val_idx, opt, step, state, log, params):
    """Refresh the table, score valid, keep the best (never a non-finite model), save last."""
    t0 = time.time()
    r.refresh_items(cfg["item_batch_size"])
    m, tm = ev.evaluate_model(r, ds, "valid", cfg, val_idx, verbose=not cfg["quiet"])
    rec = {"step": step, **{f"val/{k}": v for k, v in m.items()}, "eval_s": time.time() - t0,
           **{f"eval_{k}": v for k, v in tm.items()}}
    state["evals"].append(rec)
    finite = all(bool(torch.isfinite(p).all()) for p in params) and bool(torch.isfinite(r.table.E).all())
    better = m["ndcg@10"] > state["best"] and finite   # NaN weights are never "best"
    state["bad_evals"] = 0 if better else state["bad_evals"] + 1
    if better:
        state.update(best=m["ndcg@10"], best_step=step)
    log(rec, f"eval step {step}: " + " ".join(f"val/{k} {v:.4f}" for k, v in m.items())
        + f" | {time.time() - t0:.0f}s" + (" | new best" if better else "") + ev.examples_line(tm))
    if better:
        state.update(best_dir=os.path.abspath(os.path.join(cfg["out"], "best")), best_step=step)
        save("best", r, cfg, opt, step, state)
    save("last", r, cfg, opt, step, state)


def main(argv=None):
    data.run_cli(lambda: train(resolve_config(argv)))


if __name__ == "__main__":
    main()
