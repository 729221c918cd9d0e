"""Train R²ec with RecPO (arXiv 2505.16994, §3.2), one plain loop, top to bottom.

    python train.py --dataset ml-100k           # preset cpu: tiny backbone, <= 10 min, test table at the end
    python train.py --init-from ~/models/Qwen2.5-3B-Instruct --dataset amazon-2023:Video_Games --data-dir ~/az
    python train.py --resume out/ml-100k/last    # continue exactly where a run stopped

Stages, like nanochat's base -> RL: a from-scratch tiny backbone first reads the TRAIN split (pretrain.py),
then RecPO. This file: config (presets, checks, resume), rollout() and update() of one RL step, the loop,
evaluation calls, checkpoints, the time budget. The model: model.py; the objective: recpo.py."""
import argparse
import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import backbone
import baselines
import checkpoint
import common
import data
import eval as ev
import kernels
import model as M
import pretrain
import recpo

PRESETS = {
    # the paper (§4), and where it is silent the reference code (YRYangang/RRec); README, *Presets*
    "paper": dict(prompt_history=20, max_new_tokens=640, val_samples=0, train_recent=0, item_loss="inbatch",
                  micro_batch_size=4, embed_lr_mult=1.0, time_budget=0.0, pretrain_steps=0,
                  temperature=2.0, kl_beta=0.0, batch_size=12, gradient_checkpointing=True, patience=8,
                  max_steps=None, eval_every=None, epochs=3, lr_schedule="constant", adam_beta2=0.999,
                  logp_temperature=1.0),
    "cpu": dict(prompt_history=8, max_new_tokens=32, val_samples=1000, train_recent=10000,
                item_loss="sampled", micro_batch_size=32, embed_lr_mult=0.1, time_budget=10.0,
                pretrain_steps=2000, temperature=1.0, kl_beta=0.1, pretrain_item_weight=1.0,
                item_weighting="uniform", relabel_topk=0, cut_penalty=0.1, greedy_chain=True,
                pretrain_prompt_weight=0.25, pretrain_line_weight=1.0, item_tokens=True, num_generations=2,
                lr_schedule="cosine", adam_beta2=0.99, logp_temperature=None, pretrain_id_weight=1.0),
}
# synthetic-knowledge (README, *The knowledge world*): cpu in 5 minutes; the item head learnt by RecPO only
# (the LM stage trains neither arm's readout), at half the LR; the chain held near the stage's facts (KL 1)
PRESETS["knowledge"] = dict(PRESETS["cpu"], time_budget=5.0, prompt_history=4, pretrain_item_weight=0.0,
                            embed_lr_mult=1.0, kl_beta=1.0, lr=1e-3, baselines_first=True)
EVALS_PER_EPOCH = 8    # --preset paper without --max-steps: `epochs` epochs, evaluated 8 times each (RRec)
LR = {"tiny": 2e-3, "hf": 1e-5}   # --lr default by backbone [paper: 1e-5]
# what a resumed run may not change: it defines the data, the model or the meaning of a step
# (item tokens: the checkpoint's tokenizer has them or not)
FIXED_ON_RESUME = ("dataset", "history", "init_from", "tiny_layers", "tiny_hidden", "tiny_heads", "lora_r",
                   "lora_alpha", "tau", "num_generations", "batch_size", "seed", "prompt_history",
                   "max_prompt_len", "no_reasoning", "item_loss")
OPTIONAL_SAVED = ("resume", "preset", "data_dir", "max_prompt_len", "pretrain_steps")
MAX_BAD_STEPS = 5      # non-finite loss/grad steps in a row before the run stops
TRAIN_SHARE = 0.6      # of --time-budget, kept for training whatever the test pass is estimated to cost
PRETRAIN_SHARE = 0.35  # of --time-budget, the most the LM stage may take
MIN_LR_FRAC = 0.1      # the cosine's floor, a fraction of --lr
LOG_EVERY = 5          # one printed log line every N steps (log.jsonl: every step)
WARMUP_STEPS = 10      # linear LR warm-up, then cosine to MIN_LR_FRAC x --lr
MAX_GRAD_NORM = 1.0    # gradient clipping (TRL's default)
TEST_SAMPLES = {"none": -1, "-1": -1, "all": 0}   # --test-samples by name (-1: no test pass)
TrainError = common.UserError   # user-facing: main() prints `error: <msg>` and exits 2


# ----------------------------------------------------------------------------------------------------------
# config: defaults here, preset values in PRESETS, explicit flags win

def get_parser():
    p = common.CLIParser(description="Train R²ec with RecPO (presets: paper, the CUDA default; cpu).")
    I, I0, U = common.pos_int, common.nonneg_int, common.unit_float
    F, F0 = common.pos_float, common.nonneg_float
    yes_no = argparse.BooleanOptionalAction
    g = p.add_argument_group("data").add_argument
    g("--preset", choices=tuple(PRESETS), help="default: paper on CUDA, else cpu (the 10-minute demo; "
      "knowledge on synthetic-knowledge)")
    g("--dataset", default="ml-100k", help="ml-100k | synthetic[:UxI] | amazon-2023:<Category> | csv:<dir>")
    g("--data-dir", help="folder with the raw dataset files (data.py's default if unset)")
    g("--history", type=I, default=20, help="history window H of the samples [paper: 20]")
    g("--prompt-history", type=I, help="most recent history items in the prompt [paper: 20; cpu: 8]")
    g("--max-prompt-len", type=I, help="prompt token cap, oldest lines dropped (default: from the context)")
    g("--train-recent", type=I0, help="users from the last N train samples, 0 = all [paper: 0; cpu: 10000]")
    g = p.add_argument_group("model").add_argument
    g("--init-from", default="tiny", help="'tiny' (built-in) | hub id org/name[@rev] | local folder | .gguf")
    g("--tiny-layers", type=I, default=2, help="tiny backbone: transformer layers")
    g("--tiny-hidden", type=I, default=128, help="tiny backbone: hidden size (a multiple of --tiny-heads)")
    g("--tiny-heads", type=I, default=4, help="tiny backbone: attention heads")
    g("--item-tokens", action=yes_no, default=False, help="tiny: one token per item [cpu: yes]")
    g("--lora-r", type=I0, default=4, help="LoRA rank [paper: 4]; 0 = full fine-tuning")
    g("--lora-alpha", type=F, default=128.0, help="LoRA alpha [paper: 128]")
    g("--tau", type=F, default=0.02, help="item head temperature, s = cos / tau [paper: 0.02]")
    g = p.add_argument_group("LM stage (pretrain.py)").add_argument
    g("--pretrain-steps", type=I0, help="0 = skip [paper: 0; cpu: 2000, at most 35 %% of the budget]")
    g("--pretrain-lr", type=F, default=3e-3, help="AdamW peak LR")
    g("--pretrain-item-weight", type=F0, default=0.0, help="+ w x item loss w/o reasoning [cpu: 1]")
    g("--pretrain-line-weight", type=F0, default=0.0, help="+ w x item loss at each history line [cpu: 1]")
    g("--pretrain-prompt-weight", type=F0, default=1.0, help="prompt tokens' weight (reply: 1) [cpu: 0.25]")
    g = p.add_argument_group("rollouts").add_argument
    g("--num-generations", type=I, default=4, help="reasoning chains per user, G >= 2 [paper: 4; cpu: 2]")
    g("--temperature", type=F, help="sampling temperature [paper: 2.0; cpu: 1.0]")
    g("--top-k", type=I0, default=50, help="top-k sampling, 0 = off [paper: 50]")
    g("--greedy-chain", action=yes_no, default=False, help="chain 0 of each group greedy [cpu: yes]")
    g("--max-new-tokens", type=I0, help="reasoning token limit, train and eval [paper: 640; cpu: 32]")
    g("--no-reasoning", action="store_true", help="ablation 'w/o reasoning': anchor right after the prompt")
    g = p.add_argument_group("objective (recpo.py)").add_argument
    g("--reward", default="mix", choices=recpo.REWARD_KINDS, help="ndcg: R_d, softmax: R_c [paper: mix]")
    g("--reward-k", type=I, default=1000, help="R_d = 1/log2(r+2) if rank r < k else 0 [paper: 1000]")
    g("--reward-beta", type=U, default=0.05, help="mix: (1 - beta) R_d + beta R_c [paper: 0.05]")
    g("--cut-penalty", type=F0, default=0.0, help="reward - p for a chain cut before <answer> [paper: 0]")
    g("--advantage", default="gaussian", choices=recpo.ADVANTAGE_KINDS, help="[paper: gaussian, a z-score]")
    g("--loss-type", default="token-mean", choices=recpo.LOSS_TYPES, help="token loss aggregation [paper]")
    g("--clip-low", type=U, default=0.2, help="PPO clip epsilon below 1 [paper: 0.2]")
    g("--clip-high", type=F0, default=0.28, help="PPO clip epsilon above 1 [paper: 0.28]")
    g("--item-loss", choices=recpo.ITEM_LOSS_MODES, help="softmax over the step's targets [paper: inbatch], "
      "+ uniform negatives [cpu: sampled], or the cached table (full; experimental)")
    g("--item-negatives", type=I, default=128, help="sampled: uniform items per step, encoded with grad")
    g("--relabel-topk", type=I0, default=1, help="item loss on a group's top-k chains, 0: all [paper: 1]")
    g("--item-weighting", default="advantage", choices=("advantage", "uniform"), help="recpo.py, 12. [paper: "
      "advantage]")
    g("--kl-beta", type=F0, help="k3 KL to the model RecPO starts from [paper: 0; cpu: 0.1]")
    g("--reference-broadcast", action="store_true", help="ablation: the reference's defect (recpo.py, 1.)")
    g = p.add_argument_group("optimisation").add_argument
    g("--batch-size", type=I, default=32, help="training users per step, G rollouts each "
      "[paper: 12, RRec's 4 a GPU x 3]")
    g("--micro-batch-size", type=I, help="users per forward/backward [paper setup: 4; cpu: 32]")
    g("--gradient-checkpointing", action=yes_no, default=False, help="recompute activations in backward "
      "[paper: yes]")
    g("--num-iterations", type=I, default=1, help="optimizer passes over each rollout batch [paper: 1]")
    g("--lr", type=F, help=f"AdamW peak LR [paper: 1e-5; tiny backbone: {LR['tiny']}]")
    g("--embed-lr-mult", type=F0, help="LR factor of a trained tied embedding [paper: 1; cpu: 0.1]")
    g("--max-steps", type=I, default=2000, help="RL steps (rollouts + update) [paper: 3 epochs]")
    g("--time-budget", type=F0, help="minutes for the run, test pass included, 0 = off [paper: 0; cpu: 10]")
    g = p.add_argument_group("evaluation and output").add_argument
    g("--item-refresh", type=I, default=20, help="re-encode the item table every N steps (and before eval)")
    g("--eval-every", type=I0, default=100, help="evaluate on valid every N steps, 0: at "
      "the end only [paper: 8 times an epoch]")
    g("--patience", type=I0, default=5, help="stop after N evaluations without "
      "a better valid NDCG@10 [paper: 8]")
    g("--val-samples", type=lambda t: 0 if t == "all" else I0(t), help="valid subset [paper: all; cpu: 1000]")
    g("--eval-batch-size", type=I, default=256, help="users per reasoning batch, items per encoding batch")
    g("--test-samples", type=lambda t: TEST_SAMPLES[t] if t in TEST_SAMPLES else I0(t), default=0,
      help="final test: all (0), a seeded subset of N (said in the header), or none")
    g("--out", help="output folder (default out/<dataset>): best/, last/, log.jsonl, results.json")
    g("--resume", help="a checkpoint (out/<dataset>/last) to continue exactly; explicit flags override")
    g("--device", default="auto", help="auto (CUDA if available) | cpu | cuda[:i]")
    g("--kernels", default="auto", choices=kernels.IMPLS, help="impl= of both kernels")
    g("--seed", type=I0, default=0, help="seed of init, user sampling and rollouts")
    g("--report-to", default="none", choices=common.REPORTERS, help="also log to tensorboard or wandb")
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
        saved = checkpoint.read_run_config(args.resume, "--resume")
        # what defines a run must be saved; a flag newer than the checkpoint takes its default
        d = vars(p.parse_args([]))
        need = [k for k in d if k in FIXED_ON_RESUME or d[k] is None and k not in OPTIONAL_SAVED]
        saved = {**vars(args), **p.parse_saved(saved, os.path.join(args.resume, "run_config.json"), need)}
        changed = [k for k in FIXED_ON_RESUME if k in given and given[k] != saved.get(k)]
        if changed:
            raise TrainError(f"--resume {args.resume}: --{changed[0].replace('_', '-')} cannot change in a "
                             f"resumed run (saved {saved.get(changed[0])!r}); start a new run instead")
        checkpoint.load_train_state(args.resume, mmap=True)   # refused now (pickle, truncation), not later
        return validate({**saved, **given, "resume": args.resume})
    cpu = "knowledge" if str(args.dataset).startswith("synthetic-knowledge:") else "cpu"
    preset = args.preset or ("paper" if common.pick_device(args.device).startswith("cuda") else cpu)
    cfg = {**vars(args), **PRESETS[preset], **given, "preset": preset}
    cfg["lr"] = cfg["lr"] or LR["tiny" if cfg["init_from"] == "tiny" else "hf"]
    # the loss's token log-probs: raw logits (paper: the reference code's) or at the sampling temperature
    cfg["logp_temperature"] = cfg.get("logp_temperature") or cfg["temperature"]
    if cfg["init_from"] != "tiny":   # the LM stage and item tokens are the tiny backbone's
        cfg["pretrain_steps"] = given.get("pretrain_steps", 0)
        cfg["item_tokens"] = given.get("item_tokens", False)
    cfg["out"] = cfg["out"] or os.path.join("out", common.slug(cfg["dataset"]))
    if "max_steps" in given and "pretrain_steps" not in given:   # a bounded run: the LM stage in proportion
        cfg["pretrain_steps"] = min(cfg["pretrain_steps"], cfg["max_steps"])
    return validate(cfg)


def validate(cfg):
    """Cross-flag checks (single flags are range-checked by their argparse types)."""
    world = common.world()
    cfg["device"] = common.pick_device(cfg["device"])
    cfg["micro_batch_size"] = min(cfg["micro_batch_size"], max(1, cfg["batch_size"] // world))   # per process
    common.check_kernels(cfg["kernels"], cfg["device"])
    common.check_out_dir(cfg["out"], "--out")   # a file, or a file on the way: refused before any work
    common.reporter(cfg.get("report_to", "none"))   # its optional package, checked now
    backbone.check_init_from(cfg["init_from"], cfg.get("item_tokens", False))
    if cfg["init_from"] == "tiny":
        tiny_cfg(cfg)   # the shape, checked before anything is built
    B, mb = cfg["batch_size"], cfg["micro_batch_size"]
    procs = f" x {world} processes" if world > 1 else ""
    checks = [
        (B % (world * mb) == 0,   # torchrun: B / N users per process
         f"--batch-size {B} must be a multiple of --micro-batch-size {mb}{procs}"),
        (not (cfg["reference_broadcast"] and cfg["item_loss"] == "sampled"),
         "--reference-broadcast reproduces the reference's in-batch/full item loss; use --item-loss inbatch"),
        (cfg["num_generations"] >= 2, "--num-generations must be >= 2: advantages are relative in a group"),
        (cfg["relabel_topk"] <= cfg["num_generations"], "--relabel-topk must be <= --num-generations"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TrainError(msg)
    return cfg


def tiny_cfg(cfg):
    """The tiny backbone's shape from the flags, checked (backbone.tiny_config)."""
    return backbone.tiny_config(cfg["tiny_layers"], cfg["tiny_hidden"], cfg["tiny_heads"], cfg["seed"],
                                cfg.get("item_tokens", False))


def stage_of(cfg):
    """The LM stage's settings (pretrain.Stage) from the flags."""
    return pretrain.Stage(
        steps=cfg["pretrain_steps"], lr=cfg["pretrain_lr"], batch_size=cfg["batch_size"],
        prompt_history=cfg["prompt_history"], prompt_weight=cfg["pretrain_prompt_weight"],
        item_weight=cfg["pretrain_item_weight"], line_weight=cfg["pretrain_line_weight"],
        id_weight=cfg.get("pretrain_id_weight", 0.0),   # a PRESETS value (cpu: 1), no flag
        negatives=cfg["item_negatives"], full=cfg["item_loss"] == "full", item_refresh=cfg["item_refresh"],
        item_batch_size=cfg["eval_batch_size"], seed=cfg["seed"])


# ----------------------------------------------------------------------------------------------------------
# one RL step: rollout() then update()

def lr_at(step, cfg, horizon=None):
    """Constant (paper: the reference's HF "constant" schedule, which has no warm-up), or a linear warm-up,
    then cosine to MIN_LR_FRAC x lr over --max-steps or the steps the time budget allows (`horizon`)."""
    lr, w = cfg["lr"], WARMUP_STEPS
    if cfg.get("lr_schedule") == "constant":
        return lr
    if step < w:
        return lr * (step + 1) / w
    t = min(1.0, (step - w) / max(1, (horizon or cfg["max_steps"]) - w))
    return lr * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class Batch:
    """One step's rollouts, rewards and advantages (this process's users)."""
    idx: np.ndarray          # [b] train samples
    G: int                   # chains per user (1 without reasoning)
    ro: dict                 # the rollout rows (model.R2ec.decode), b*G of them
    targets: torch.Tensor    # [b*G] target item of each row
    hist: torch.Tensor       # [b*G, H] history ids, masked in the rewards and the full item loss
    neg: object              # [S] uniform negatives (--item-loss sampled) or None
    rw: dict                 # recpo.compute_rewards: reward, r_d, r_c, rank [b*G]
    adv: torch.Tensor        # [b*G]
    chunks: list             # micro-batches of rows (model.slice_rollout), each with "rows"
    log_rows: tuple          # (rw, adv, frac zero-std, rollout masks) of ALL processes: recpo.step_metrics


def rollout(r, ds, cfg, step, ref=None, ph=None):
    """Users -> G chains each with h_T (one cached pass) -> rewards over the full catalog -> advantages."""
    ph = ph or common.Phases()
    common.fit_threads(r.device)   # CPU: threads = the cores other processes leave free
    tr, B = ds.train, cfg["batch_size"]
    mine = common.rank_slice(B)   # torchrun: this process's users of the B
    G = 1 if cfg["no_reasoning"] else cfg["num_generations"]   # w/o reasoning the G chains would be equal
    pool = np.arange(len(tr))[-cfg["train_recent"]:] if cfg["train_recent"] else np.arange(len(tr))
    idx = pool[data.train_indices(step, B, len(pool), cfg["seed"])][mine]               # [b]
    targets = torch.from_numpy(np.repeat(tr.target[idx], G)).to(r.device)              # [b*G]
    hist = torch.from_numpy(np.repeat(tr.hist[idx], G, axis=0)).to(r.device)           # [b*G, H]
    neg = None
    if cfg["item_loss"] == "sampled":   # uniform items, the same on every process
        n = min(cfg["item_negatives"], ds.num_items)
        draw = np.random.default_rng([cfg["seed"], step, 1]).choice(ds.num_items, n, replace=False)
        neg = torch.from_numpy(np.sort(draw + 1)).to(r.device)                          # [S]
    prompts = r.split_prompt_ids(tr, idx, cfg["prompt_history"])
    r.model.eval()
    with ph("rollout"), torch.no_grad(), common.autocast(r.device):
        # a chain's noise: (seed, step, its user's position in the step); resumed and torchrun runs agree
        ro, h_T = r.decode(prompts, G, greedy=False, temperature=cfg["temperature"], top_k=cfg["top_k"],
                           max_new_tokens=0 if cfg["no_reasoning"] else cfg["max_new_tokens"],
                           seed=(cfg["seed"], step), first=mine.start, greedy_first=cfg["greedy_chain"])
        mb, n = cfg["micro_batch_size"] * G, len(idx) * G
        rows = [torch.arange(s, min(s + mb, n), device=r.device) for s in range(0, n, mb)]
        chunks = [M.slice_rollout(ro, x) for x in rows]
        for c in chunks if ref is not None else []:   # the frozen initial model, for the k3 KL
            c["ref_logp"] = ref.forward_both(c, G, cfg["logp_temperature"])[0]
    r.model.train()
    with ph("reward"):
        rw = recpo.compute_rewards(h_T, r.table.E, targets, hist, cfg["tau"], cfg["reward_k"],
                                   cfg["reward_beta"], cfg["reward"], impl=cfg["kernels"])
        if G > 1:   # a format reward: a chain cut at the cap before <answer>
            rw["reward"] = rw["reward"] - cfg["cut_penalty"] * ro["cut"].float()
        adv, frac0 = recpo.compute_advantages(rw["reward"], G, cfg["advantage"])        # [b*G]
    masks = {k: ro[k] for k in ("sampled_mask", "attention_mask", "cut")}
    rw_all, adv_all = common.all_gather((rw, adv))
    frac0_all = common.all_reduce({"f": frac0})["f"] / common.world()
    log_rows = (rw_all, adv_all, frac0_all, common.all_gather(masks))
    return Batch(idx=idx, G=G, ro=ro, targets=targets, hist=hist, neg=neg, rw=rw, adv=adv, chunks=chunks,
                 log_rows=log_rows)


def update(r, cfg, batch, opt, params, lr, ph=None):
    """--num-iterations optimizer steps over the rollout batch: per micro-batch forward_both -> token_loss +
    item_loss -> backward; then clip and AdamW. pi_old is the first pass's own log-probs (detached), so the
    ratio is exactly 1 on the first pass. A non-finite loss or gradient skips the optimizer step. The table
    rows re-encoded in a pass are written after it (no micro-batch's loss depends on another's writes)."""
    ph = ph or common.Phases()
    G, iters = batch.G, cfg["num_iterations"]
    n_rows = batch.targets.shape[0] * common.world()   # rows of the GLOBAL batch
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    stats, old = {}, {}
    # the item softmax's in-batch candidates are every target of the step, across micro-batches and
    # processes (as in the reference code's one batch): encoded once without gradient; each micro-batch's own
    # targets enter fresh with gradient (same values): the objective does not depend on how the step is split
    step_ids = torch.unique(common.all_gather(batch.targets))                          # [U]
    step_emb = torch.zeros(0, r.model.config.hidden_size, device=r.device)
    if cfg["item_loss"] != "full" and (len(batch.chunks) > 1 or common.world() > 1):
        with ph("item encoding"), torch.no_grad(), common.autocast(r.device):
            step_emb = r.encode_items(step_ids.tolist(), batch_size=cfg["eval_batch_size"])   # [U, d]
    else:
        step_ids = step_ids[:0]   # one micro-batch: its own targets are all of the step's
    for it in range(iters):
        writes = []
        for ci, c in enumerate(batch.chunks):
            rows = c["rows"]
            tgt, a, excl = batch.targets[rows], batch.adv[rows], batch.hist[rows]   # [b] [b] [b, H]
            uniq, inv = torch.unique(tgt, return_inverse=True)
            ids = uniq if batch.neg is None else torch.cat([uniq, batch.neg])                  # [u (+S)]
            with ph("forward (tokens)"), common.autocast(r.device):
                # [b, C], [b, d], [b, C]
                logp, h_T, ent = r.forward_both(c, G, cfg["logp_temperature"], return_entropy=True)
            with ph("item encoding"), common.autocast(r.device):
                emb = r.encode_items(ids.tolist(), grad=True, batch_size=cfg["eval_batch_size"])  # [u(+S), d]
            writes.append((ids, emb.detach()))
            others = ~torch.isin(step_ids, uniq)                         # the step's other targets
            neg_ids = torch.cat([step_ids[others], ids[len(uniq):]])
            mode, neg = cfg["item_loss"], None
            if mode != "full" and len(neg_ids):   # extra candidates: the "sampled" form of the same softmax
                mode, neg = "sampled", (neg_ids, torch.cat([step_emb[others], emb[len(uniq):]]))
            kw = dict(tau=cfg["tau"], mode=mode, E=r.table.E, exclude=excl, impl=cfg["kernels"],
                      negatives=neg)
            with ph("losses"):
                if iters > 1 and it == 0:   # pi_old on the update's own numerical path
                    with torch.no_grad():
                        old[ci] = (logp.detach(), recpo.item_logprobs(h_T, emb[inv], tgt, **kw))
                P = c["prompt_len"]
                tl, ts = recpo.token_loss(logp, old[ci][0] if old else None, a, c["sampled_mask"][:, P:],
                                          cfg["clip_low"], cfg["clip_high"], cfg["loss_type"],
                                          cfg["max_new_tokens"], c.get("ref_logp"), cfg["kl_beta"],
                                          reference_broadcast=cfg["reference_broadcast"], entropy=ent)
                il, is_ = recpo.item_loss(h_T, emb[inv], tgt, a, old[ci][1] if old else None, G,
                                          cfg["relabel_topk"], eps_low=cfg["clip_low"],
                                          eps_high=cfg["clip_high"], weighting=cfg["item_weighting"],
                                          reference_broadcast=cfg["reference_broadcast"], **kw)
            w = len(c["rows"]) / n_rows   # gradient accumulation: micro-batch losses weighted by their share
            with ph("backward"):
                ((tl + il) * w).backward()
            if it == iters - 1:   # report the last pass (where clipping can be active)
                for k, v in {**ts, **is_}.items():
                    stats[k] = stats.get(k, 0.0) + v * (1 if k == "num_tokens" else w)
        with ph("optimizer"):
            # torchrun: all processes' table writes (single-process order); grads and stats summed
            r.table.update(*(common.all_gather(torch.cat(x)) for x in zip(*writes)))
            common.all_reduce_grads(params)
            stats = common.all_reduce(stats)
            gn = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
            losses = (stats.get(k, 0.0) for k in ("token_loss", "item_loss"))
            finite = math.isfinite(gn) and all(math.isfinite(x) for x in losses)
            if finite:
                opt.step()
            opt.zero_grad(set_to_none=True)
    return {**stats, "grad_norm": gn, "skipped": not finite}


# ----------------------------------------------------------------------------------------------------------
# build, save, resume

def build(cfg, ds, verbose=True):
    """-> (R2ec, trainable params, train_state or None): fresh from --init-from, or from --resume."""
    res = cfg.get("resume")
    lora_r = 0 if cfg["init_from"] == "tiny" else cfg["lora_r"]
    # full fine-tuning keeps fp32 master weights (bf16 compute under CUDA autocast): AdamW's ~1e-5 steps
    # vanish in bf16 weights. LoRA: a bf16 base on CUDA (frozen), fp32 adapters.
    dtype = torch.float32 if lora_r == 0 else None
    if res and lora_r == 0:   # the checkpoint holds every weight: load it as is
        model, tok = backbone.build_backbone(res, None, device=cfg["device"], verbose=False, dtype=dtype)
    else:   # rank 0 first: it caches the tokenizer
        model, tok = common.main_first(backbone.build_backbone, cfg["init_from"], ds, tiny_cfg=tiny_cfg(cfg),
                                       device=cfg["device"], verbose=verbose, dtype=dtype)
    params = backbone.apply_lora(model, lora_r, cfg["lora_alpha"])
    if res and lora_r > 0:   # base weights from --init-from + the saved adapter
        backbone.load_lora_state(model, os.path.join(res, "adapter.safetensors"))
    r = M.R2ec(model, tok, ds, tau=cfg["tau"], max_prompt_len=cfg["max_prompt_len"], impl=cfg["kernels"])
    if cfg.get("gradient_checkpointing"):   # after apply_lora: frozen embeddings then need input grads
        r.enable_gradient_checkpointing()
    r.split_prompt_ids(ds.train, [0], cfg["prompt_history"])   # a too small --max-prompt-len fails here
    if res:   # the item table as saved (the checkpoint's item map is checked against the dataset)
        checkpoint.read_item_map(res, ds)
        r.table = checkpoint.load_item_table(res, ds.num_items, r.table.E.shape[1], r.device)
    else:
        r.refresh_items(cfg["eval_batch_size"])
    model.train()
    return r, params, checkpoint.load_train_state(res) if res else None


def param_groups(r, params, embed_lr_mult=1.0):
    """AdamW groups: the tied embedding / LM head (if trained) at lr x embed_lr_mult, the rest at lr."""
    emb = r.lm_weight
    if not any(p is emb for p in params):
        return [{"params": params, "lr_mult": 1.0}]
    rest = [p for p in params if p is not emb]
    return [{"params": rest, "lr_mult": 1.0}, {"params": [emb], "lr_mult": embed_lr_mult}]


def optimizer(r, params, cfg, saved):
    """AdamW -> (opt, state, step); resuming: with the saved optimizer, RNG and counters."""
    groups = param_groups(r, params, cfg["embed_lr_mult"])
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, cfg.get("adam_beta2", 0.99)), weight_decay=0.0)
    state = {"best": -1.0, "best_step": -1, "bad_evals": 0, "evals": [], "skipped": 0}
    if saved is None:
        return opt, state, 0
    opt.load_state_dict(saved["optimizer"])
    checkpoint.set_rng_state(saved["rng"])
    return opt, {**state, **saved["state"]}, saved["step"]


def save(name, r, cfg, opt, step, state):
    """A checkpoint out/<run>/<name>: weights, table, config, item map; optimizer, RNG and counters."""
    st = {"step": step, "optimizer": opt.state_dict(), "rng": checkpoint.rng_state(), "state": state}
    run_config = {**cfg, "max_prompt_len": r.max_prompt_len}
    checkpoint.save_checkpoint(os.path.join(cfg["out"], name), r, run_config, st)


# ----------------------------------------------------------------------------------------------------------
# the loop

def train(cfg):
    t_start, budget = time.time(), cfg["time_budget"] * 60
    ds = data.load_for_run(cfg, verbose=common.is_main())
    if cfg.get("baselines_first") and common.is_main() and not os.path.exists(ev.baselines_path(ds)):
        print("popularity and SASRec first (baselines.py: their table is not in out/baselines yet)")
        argv = ["--dataset", cfg["dataset"], "--seed", str(cfg["seed"]), "--history", str(cfg["history"])]
        threads = torch.get_num_threads()
        baselines.run(baselines.get_parser().parse_args(argv))   # SASRec runs on one thread
        torch.set_num_threads(threads)
        t_start = time.time()   # R2ec's budget starts now: a run is the same whether they ran first or not
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    bars = common.show_progress()
    if None in (cfg["max_steps"], cfg["eval_every"]):   # --preset paper: the reference's epochs and cadence
        n = math.ceil(cfg["epochs"] * len(ds.train) / cfg["batch_size"])
        cfg["max_steps"] = cfg["max_steps"] or n
        if cfg["eval_every"] is None:
            cfg["eval_every"] = max(1, n // (cfg["epochs"] * EVALS_PER_EPOCH))
    r, params, saved = build(cfg, ds, verbose=common.is_main())
    opt, state, step = optimizer(r, params, cfg, saved)
    log = common.jsonl_logger(os.path.join(cfg["out"], "log.jsonl"), cfg.get("report_to", "none"))
    checkpoint.clean_checkpoints(cfg["out"])
    print(f"preset {cfg['preset']} | config:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(cfg.items())))
    staged = saved is None and cfg["pretrain_steps"] > 0
    stage = f"an LM stage of at most {cfg['pretrain_steps']} steps, then " * staged
    ends = f"ends within {cfg['time_budget']:g} min, test pass included" if budget else "no time budget"
    print(f"plan: {stage}RecPO steps {step} to {cfg['max_steps']}; {ends}")
    if staged:   # stage 1, the LM stage (train split only); then RecPO
        st = pretrain.lm_stage(r, params, ds.train, stage_of(cfg), PRETRAIN_SHARE * budget, log)
        state["pretrain"] = st
        log(st, "LM stage: {steps} steps, loss {loss:.3f}, {seconds:.0f}s".format(**st))
        r.refresh_items(cfg["eval_batch_size"])
    ref = None
    if cfg["kl_beta"]:   # the frozen model RecPO starts from (after the LM stage)
        frozen = copy.deepcopy(r.model).eval().requires_grad_(False)
        ref = M.R2ec(frozen, r.tok, None, cfg["tau"], r.max_prompt_len, cfg["kernels"])
    val_idx = ev.valid_subset(ds, cfg["val_samples"], cfg["seed"])
    log({"config": cfg, "val_samples": len(val_idx)})
    if step == 0 and saved is None and cfg["eval_every"] > 0:
        run_eval(r, ds, cfg, val_idx, opt, step, state, log, params)   # untrained: reference point + timing

    def last_eval_s():
        return state["evals"][-1]["eval_s"] if state["evals"] else 0.0

    def left():   # seconds of training left, the final valid and test passes reserved
        final = ev.final_cost(state, len(ds.test), cfg, TRAIN_SHARE)
        return budget - (time.time() - t_start) - final - last_eval_s()

    times, stop, records, bad = [], None, [], 0
    bar = tqdm(total=None if budget else cfg["max_steps"], initial=step, desc="RecPO", disable=not bars)
    while step < cfg["max_steps"]:
        # the slowest recent step must still fit; any_rank: every process stops at the same step
        if budget and common.any_rank(max(times[-10:] or [0]) > left()):
            stop = f"time budget ({cfg['time_budget']:g} min; a last valid and the test pass reserved)"
            break
        t0, ph = time.time(), common.Phases(r.device.type == "cuda")
        if step and step % cfg["item_refresh"] == 0:
            r.refresh_items(cfg["eval_batch_size"])
        if budget and len(times) >= 10 and not state.get("horizon"):   # the LR's horizon, evaluations counted
            per = np.mean(times[-10:]) + (last_eval_s() / cfg["eval_every"] if cfg["eval_every"] else 0)
            state["horizon"] = min(cfg["max_steps"], step + int(left() / per))
        lr = lr_at(step, cfg, state.get("horizon"))
        batch = rollout(r, ds, cfg, step, ref, ph)
        stats = update(r, cfg, batch, opt, params, lr, ph)
        step += 1
        times.append(time.time() - t0)
        tokens = int(batch.log_rows[3]["attention_mask"].sum()) * cfg["num_iterations"]
        rec = {"step": step, **recpo.step_metrics(*batch.log_rows, stats), "learning_rate": lr,
               "step_s": times[-1], "phases_s": dict(ph.s), "tokens_per_s": tokens / times[-1]}
        if r.device.type == "cuda":   # the run's peak so far (the GPU check reports it)
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(r.device) / 2 ** 30
        one_pass = cfg["num_iterations"] == 1   # then every ratio is 1: clip fractions are 0 by construction
        ppo_only = ("clip_ratio/", "item_clip_") if one_pass else ()
        rec = {k: v for k, v in rec.items() if v is not None and not k.startswith(ppo_only)}
        records.append(rec)
        if len(times) == 2:   # how long the rest will take, from the steps and the evaluation measured
            n_evals = (cfg["max_steps"] - step) // cfg["eval_every"] + 1 if cfg["eval_every"] else 1
            est = (cfg["max_steps"] - step) * np.mean(times) + n_evals * last_eval_s()
            est += ev.final_cost(state, len(ds.test), cfg, TRAIN_SHARE)
            until = f"; the budget stops it at {cfg['time_budget']:g} min" * bool(budget and est > left())
            print(f"about {est:.0f}s left at {np.mean(times):.2f}s a step and {last_eval_s():.0f}s an "
                  f"evaluation{until}")
        bar.update(1)
        bar.set_postfix(reward=f"{rec['reward']:.3f}", nll=f"{rec['item_nll']:.3f}")
        bad = bad + 1 if stats["skipped"] else 0
        state["skipped"] += int(stats["skipped"])
        if bad >= MAX_BAD_STEPS:
            raise TrainError(f"{bad} steps in a row with a non-finite loss or gradient (last: step {step}); "
                             "lower --lr, or resume from the last checkpoint")
        if stats["skipped"]:   # every step's record goes to log.jsonl; a line every LOG_EVERY steps
            log(rec, f"step {step}: loss or gradient not finite: update skipped")
        else:
            log(rec, recpo.format_metrics(rec) if step % LOG_EVERY == 0 or step == 1 else None)
        if cfg["eval_every"] and step % cfg["eval_every"] == 0:
            run_eval(r, ds, cfg, val_idx, opt, step, state, log, params)
            if cfg["patience"] and state["bad_evals"] >= cfg["patience"]:
                stop = f"early stopping: {cfg['patience']} evaluations without a better valid NDCG@10"
                break
    bar.close()
    evaluated = state["evals"] and state["evals"][-1]["step"] == step
    if cfg["eval_every"] and not evaluated and not (budget and common.any_rank(left() < 0)):
        run_eval(r, ds, cfg, val_idx, opt, step, state, log, params)
    if not os.path.isdir(state.get("best_dir", "")):   # no evaluation: the last model is the best one
        r.refresh_items(cfg["eval_batch_size"])
        state.update(best_dir=os.path.abspath(os.path.join(cfg["out"], "best")), best_step=step)
        save("best", r, cfg, opt, step, state)
    save("last", r, cfg, opt, step, state)
    print(f"stopped at step {step}: {stop or 'max steps'} | best valid NDCG@10 {state['best']:.4f} at step "
          f"{state['best_step']} | {state['skipped']} steps skipped (non-finite) | "
          f"{time.time() - t_start:.0f}s so far")
    b, staged = state["best_step"], "pretrain" in state
    if b == 0 or step < 2 * WARMUP_STEPS:   # the LM stage's model, or barely more
        why = "the LM stage's model, never beaten on valid" if staged and not b else "essentially untrained"
        why += " by RecPO" * (staged and b > 0)
        print(f"warning: the best checkpoint is from RecPO step {b} of {step}: {why}; the numbers below are "
              "not a RecPO-trained model's (a longer --time-budget or a less busy machine helps)")
    result = {"best_step": state["best_step"], "best_val_ndcg@10": state["best"], "steps": step,
              "evals": state["evals"]}
    if cfg["test_samples"] >= 0:
        name = f"R2ec (best, step {state['best_step']})"
        m, tm, rows = ev.evaluate_checkpoint(state["best_dir"], ds, "test", cfg["device"],
                                             cfg["eval_batch_size"], name, common.is_main(),
                                             samples=cfg["test_samples"], seed=cfg["seed"])
        log({"test": m, "best_step": state["best_step"], "baselines": rows})
        result.update(test=m, table=ev.format_table(rows), test_timing=tm)
    result["seconds"] = time.time() - t_start
    if common.is_main():
        common.atomic_write(os.path.join(cfg["out"], "results.json"), json.dumps(result, indent=1))
    print(f"done in {result['seconds']:.0f}s -> {cfg['out']}")
    return {**result, "log": records}


def run_eval(r, ds, cfg, val_idx, opt, step, state, log, params):
    """Refresh the table, score valid, keep the best (never a non-finite model), save last."""
    t0 = time.time()
    r.refresh_items(cfg["eval_batch_size"])
    m, tm = ev.evaluate_model(r, ds, "valid", cfg, val_idx, verbose=common.show_progress())
    rec = {"step": step, **{f"val/{k}": v for k, v in m.items()}, "eval_s": time.time() - t0,
           **{f"eval_{k}": v for k, v in tm.items()}}
    state["evals"].append(rec)
    finite = all(bool(torch.isfinite(p).all()) for p in params) and bool(torch.isfinite(r.table.E).all())
    better = m["ndcg@10"] > state["best"] and finite   # NaN weights are never "best"
    state["bad_evals"] = 0 if better else state["bad_evals"] + 1
    line = f"eval step {step}: " + " ".join(f"val/{k} {v:.4f}" for k, v in m.items())
    line += f" | {time.time() - t0:.0f}s" + (" | new best" if better else "") + ev.examples_line(tm)
    log(rec, line)
    if better:
        state.update(best=m["ndcg@10"], best_step=step)
        state["best_dir"] = os.path.abspath(os.path.join(cfg["out"], "best"))
        save("best", r, cfg, opt, step, state)
    save("last", r, cfg, opt, step, state)


def main(argv=None):
    common.run_cli(lambda: train(resolve_config(argv)))


if __name__ == "__main__":
    main()
