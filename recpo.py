"""RecPO: the whole reinforcement-learning objective of R²ec, as pure functions (arXiv 2505.16994, §3.2).

What the paper does
    For each training user the policy writes G reasoning chains [G = 4]. Each chain ends at the
    anchor `<answer>`, whose final hidden state h_T scores every item by s(v) = cos(h_T, h_v) / τ
    [τ = 0.02]. A chain is rewarded by how well its h_T ranks the user's true next item v⁺:
        R = (1 - β)·R_d + β·R_c,   R_d = 1[r < k] / log2(r + 2) [k = 1000],   R_c = softmax(s)[v⁺]
    with β = 0.05 and r the rank of v⁺ over the catalog. Advantages are the rewards z-scored inside
    each group of G. Two losses, both PPO clipped surrogates with ε_low = 0.2, ε_high = 0.28:
        token loss  on every reasoning token, ratio π_θ(o_t) / π_old(o_t), the chain's advantage;
        item loss   on the item "action" after the reasoning, for the top-k chains by advantage of
                    each group [k = 1; the authors' launch script uses 2], with
                    π(v⁺ | x, o) = softmax of s over the batch's target items.
    Total loss = token loss + item loss. No KL term.

What this file does
    compute_rewards -> compute_advantages -> token_loss + item_loss: every loss term the trainer can
    run lives here (the three item-loss modes, the KL); item_logprobs gives log π of the item action.
    Nothing here knows about the model or the data; train.py does rollouts and forwards and calls these.

Departures from the paper / the authors' reference code, and why
 1. The reference code's broadcast defect. It multiplies a per-row quantity of shape (N, 1) (token
    ratios (N, L), item ratios (N, 1)) by advantages of shape (N, 1, 1); broadcasting builds an N×N
    outer product whose mean is mean(A) · mean(ratio) instead of mean(A_i · ratio_i). Inside a group
    z-scored advantages sum to zero, so the reasoning tokens get ~no gradient, and the item loss turns
    into a plain in-batch contrastive loss (all rows, not just the top-k) scaled by the mean of the
    selected advantages. We implement the element-wise objective of the paper.
    `reference_broadcast=True` reproduces the defect faithfully, for ablation only.
 2. Old log-probs: the reference's ratio is exp(logp - logp.detach()); ours takes π_old from the update's
    first pass (its own numerical path), so --num-iterations > 1 is real PPO; with 1 the ratio is exactly 1.
 3. Leave-one-out advantage. The reference computes R_i·(1 + 1/G) - mean(R), which is not a
    leave-one-out baseline (its group sum is mean(R), not 0). We use R_i - mean_{j≠i} R_j.
 4. Z-score std: the unbiased (G - 1) estimator, as the reference code and TRL's GRPO do; so G ≥ 2.
 5. Rewards over the full catalog with the user's history and padding masked and a *pessimistic*
    rank (ties count against the model), as in evaluation (eval.py); a target inside its own history
    gets R_d = R_c = 0 (the reference masks history too, so its target also scores ~nothing).
 6. In-batch candidates: the step's *distinct* targets (all micro-batches and processes; others' detached,
    like the reference's all-gather), each once. The reference has a column per user, so a second user with
    the same target is a negative; here a duplicate of the positive is never a negative, none counts twice.
 7. The item loss is summed over the selected rows and divided by the number of rows B (non-top-k
    rows weigh 0), as in the reference, so the token/item balance matches the authors' runs.
 8. Token aggregation: "token-mean" (default; the reference's sum / #tokens), "sequence-mean" (the
    GRPO paper) or "dr-grpo" (sum / (B · max_len), a constant: Liu et al. 2025, "Dr. GRPO").
 9. Optional KL to a frozen reference (k3 estimator), off by default as in the paper; the entropy is logged.
10. Beyond the paper, two more candidate sets for the item softmax (see item_logprobs): "sampled", the
    targets + S uniform items, all fresh with grad (the CPU default: in-batch negatives follow popularity,
    which an in-batch softmax divides out); "full", the whole cached table (the fused catalog kernel).
11. With --relabel-topk >= 2 a selected chain can have a negative advantage, which would push π(v⁺)
    *down*; the reference's summed advantages never do. We clamp the selected advantages at 0.
12. Optional (`weighting="uniform"`): the selected rows' item loss as a plain cross-entropy, each row
    weight 1. The paper's A⁺/B gives a user ~A⁺/G of a w/o-reasoning user's item gradient, and none in
    a group of equal rewards.
13. Sampling: temperature 2.0, top-k 50, the paper's (§4); the reference code samples at 1.5, top-k 200. Both
    score tokens on raw logits (train.py's log-prob temperature 1 under --preset paper).
14. AdamW with fp32 states (β 0.9 / 0.999, no weight decay, as the reference); the reference keeps them paged
    8-bit (bitsandbytes, not a dependency here): the same update up to the states' quantisation."""
import torch

from kernels.catalog import catalog_loss, catalog_stats

REWARD_KINDS = ("ndcg", "softmax", "mix")
ADVANTAGE_KINDS = ("gaussian", "loo")
LOSS_TYPES = ("token-mean", "sequence-mean", "dr-grpo")
ITEM_LOSS_MODES = ("inbatch", "sampled", "full")


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {'|'.join(allowed)}, got {value!r}")


# -----------------------------------------------------------------------------
# reward and advantage (no gradient)

@torch.no_grad()
def compute_rewards(H, E, targets, exclude, tau, k=1000, beta=0.05, kind="mix", impl="auto"):
    """Reward of each trajectory from its user state over the full catalog.

    H [M,d] user states h_T (L2-normalised), E [N,d] item table (L2-normalised; row 0 = padding),
    targets [M], exclude [M,X] history ids, 0-padded (or None). Returns fp32 tensors
    reward/r_d/r_c [M] and the 0-based pessimistic rank [M] (N when the target is excluded)."""
    _check("kind", kind, REWARD_KINDS)
    st = catalog_stats(H, E, targets, exclude, tau=tau, impl=impl)
    N = E.shape[0]
    # a non-finite user state or score is a miss on every backend: NaN can never earn a reward
    bad = ~torch.isfinite(H.float()).all(1) | ~torch.isfinite(st.target_logit) | ~torch.isfinite(st.lse)
    rank = torch.where(bad, N, st.rank)                              # [M] int64
    hit = rank < N                                                   # False: target in history (or NaN)
    zero = torch.zeros_like(st.lse)
    r_d = torch.where(hit & (rank < k), 1.0 / torch.log2(rank.float() + 2.0), zero)   # [M]
    r_c = torch.where(hit, torch.exp(st.target_logit - st.lse), zero)                 # [M]
    reward = {"ndcg": r_d, "softmax": r_c, "mix": (1.0 - beta) * r_d + beta * r_c}[kind]
    return {"reward": reward, "r_d": r_d, "r_c": r_c, "rank": rank}


@torch.no_grad()
def compute_advantages(rewards, G, kind="gaussian", eps=1e-8):
    """Group-relative advantages. rewards [B*G], G consecutive rows per user.

    Returns adv [B*G] fp32 and the fraction of groups whose G rewards are all equal (those groups
    teach nothing: every advantage is exactly 0). G = 1 (w/o reasoning): A = 1 everywhere."""
    _check("kind", kind, ADVANTAGE_KINDS)
    if G == 1:   # the w/o-reasoning ablation: nothing to compare in a group; every chain gets A = 1
        return torch.ones_like(rewards, dtype=torch.float32), 0.0
    if G < 2 or rewards.numel() % G:
        raise ValueError(f"need G >= 2 dividing the number of rewards, got G={G} for "
                         f"{rewards.numel()} rewards")
    R = rewards.float().view(-1, G)                                  # [B, G]
    mean = R.mean(1, keepdim=True)                                   # [B, 1]
    if kind == "gaussian":
        adv = (R - mean) / (R.std(1, keepdim=True) + eps)            # unbiased std, as TRL/reference
    else:
        adv = R - (R.sum(1, keepdim=True) - R) / (G - 1)             # R_i - mean of the others
    same = R.amax(1, keepdim=True) == R.amin(1, keepdim=True)         # [B, 1] all G rewards equal
    adv = adv.masked_fill(same, 0.0)    # exactly 0: rounding of mean and std must not invent a signal
    return adv.reshape(-1), same.float().mean().item()


# -----------------------------------------------------------------------------
# the clipped surrogate shared by both losses

def _surrogate(ratio, adv, eps_low, eps_high, reference_broadcast):
    """-min(r·A, clip(r)·A). ratio [B,L], adv [B] -> [B,L]; or [B,B,L] in the reference's broadcast."""
    A = adv[:, None, None] if reference_broadcast else adv[:, None]   # [B,1,1] makes an outer product
    return -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)


def _clip_fractions(ratio, adv, mask, eps_low, eps_high):
    """Fraction of tokens where min() picks the clipped branch (zero gradient), per side."""
    A = adv[:, None].expand_as(ratio)                                # [B, L]
    low = (ratio < 1 - eps_low) & (A < 0) & mask                     # pushed down too far already
    high = (ratio > 1 + eps_high) & (A > 0) & mask                   # pushed up too far already
    n = mask.sum().clamp(min=1)
    return (low.sum() / n).item(), (high.sum() / n).item()


def _aggregate(per_tok, mask, loss_type, max_len):
    """Reduce the last two dims [B,L] of per_tok ([B,L] or [B',B,L]) with the float mask [B,L]."""
    summed = (per_tok * mask).sum((-2, -1))
    if loss_type == "token-mean":                                    # every token weighs the same
        return summed / mask.sum().clamp(min=1)
    if loss_type == "sequence-mean":                                 # every sequence weighs the same
        return ((per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean(-1)
    return summed / (mask.shape[0] * (max_len or mask.shape[1]))     # dr-grpo: a constant divisor


# -----------------------------------------------------------------------------
# token loss: the reasoning

def token_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.28, loss_type="token-mean",
               max_len=None, ref_logp=None, kl_beta=0.0, reference_broadcast=False, entropy=None):
    """PPO clipped surrogate over the reasoning tokens.

    logp [B,L] (with grad), old_logp [B,L] from the rollout (None: ratio 1), adv [B],
    mask [B,L] (True on completion tokens), max_len: dr-grpo's constant (default L),
    ref_logp [B,L] frozen-reference log-probs for the k3 KL, entropy [B,L] (logged, its token mean).
    Returns (scalar loss, stats dict of floats)."""
    _check("loss_type", loss_type, LOSS_TYPES)
    m, mf = mask.bool(), mask.bool().float()
    logp, adv = logp.float(), adv.detach().float()
    old = logp.detach() if old_logp is None else old_logp.detach().float()
    ratio = torch.exp((logp - old).masked_fill(~m, 0.0))             # [B, L]; padding -> 1, never inf
    per_tok = _surrogate(ratio, adv, eps_low, eps_high, reference_broadcast)   # [B,L] | [B,B,L]
    kl = None
    if ref_logp is not None:
        d = (ref_logp.detach().float() - logp).masked_fill(~m, 0.0)  # [B, L] log π_ref/π_θ
        kl = torch.exp(d) - d - 1                                    # k3 >= 0, E = KL(π_θ||π_ref)
        if kl_beta:
            per_tok = per_tok + kl_beta * kl
    # the trailing mean only matters for the reference's [B,B,L]: it averages the outer product
    loss = _aggregate(per_tok, mf, loss_type, max_len).mean()
    n = mf.sum().clamp(min=1)
    clip_low, clip_high = _clip_fractions(ratio.detach(), adv, m, eps_low, eps_high)
    stats = {"token_loss": loss.item(), "clip_low": clip_low, "clip_high": clip_high,
             "ratio_mean": ((ratio.detach() * mf).sum() / n).item(), "num_tokens": int(mf.sum().item())}
    if kl is not None:
        stats["kl"] = ((kl.detach() * mf).sum() / n).item()
    if entropy is not None:
        stats["entropy"] = ((entropy.detach().float() * mf).sum() / n).item()   # token mean over the mask
    return loss, stats


# -----------------------------------------------------------------------------
# item loss: the recommendation

def _first_rows(targets):
    """Distinct ids of targets [B] and the first row holding each: (uniq [U], first [U], inv [B])."""
    uniq, inv = torch.unique(targets, return_inverse=True)           # inv[b]: column of row b's id
    rows = torch.arange(targets.shape[0], device=targets.device)
    first = torch.full_like(uniq, targets.shape[0]).scatter_reduce(0, inv, rows, "amin")
    return uniq, first, inv


def item_logprobs(h_T, item_emb, targets, tau, mode="inbatch", E=None, exclude=None, rows=None,
                  impl="auto", negatives=None):
    """log π(v⁺ | x, o) [n] of the item action, for `rows` [n] of the batch (default all B).

    h_T [B,d] user states, item_emb [B,d] fresh embeddings of each row's target (rows with the same
    target hold the same item; its first row stands for it), both the item head's output
    (model.R2ec.item_head: unit vectors, so h . e / tau is the paper's cos / tau).
    inbatch: softmax over the batch's distinct targets, so duplicates of v⁺ are neither negatives
             nor counted twice.
    sampled: the same, over the distinct ids of the targets + negatives = (ids [S], emb [S,d]) (fresh
             embeddings of uniformly drawn items; an id that is also a target appears once).
    full:    softmax over the cached table E [N,d] (item head outputs), history `exclude` [B,X] masked; the
             batch's fresh target rows keep the table's VALUES and take their own gradient
             (straight-through: fresh targets among stale rows were a shortcut the model learned)."""
    _check("mode", mode, ITEM_LOSS_MODES)
    B = h_T.shape[0]
    rows = torch.arange(B, device=h_T.device) if rows is None else rows
    h = h_T[rows].float()                                            # [n, d]
    e = item_emb.float()                                             # [B, d]
    if mode == "sampled" and negatives is None:
        raise ValueError("item_logprobs(mode='sampled') needs negatives=(ids [S], emb [S,d])")
    if mode == "sampled":
        ids, emb = negatives
        targets = torch.cat([targets, ids.to(targets.device)])       # [B+S] candidates, targets first
        e = torch.cat([e, emb.float()])                              # [B+S, d]
    uniq, first, inv = _first_rows(targets)
    if mode != "full":
        s = h @ e[first].T / tau                                     # [n, U] one column per item
        return torch.log_softmax(s, dim=1).gather(1, inv[rows][:, None]).squeeze(1)   # [n]
    if E is None:
        raise ValueError("item_logprobs(mode='full') needs the item table E")
    E = E.detach()   # the fresh rows enter with the table's values and their own gradient (straight-through)
    table = E.index_copy(0, uniq, E[uniq] + (e[first] - e[first].detach()).to(E.dtype))   # [N, d]
    excl = None if exclude is None else exclude[rows]
    return -catalog_loss(h.to(E.dtype), table, targets[rows], excl, tau=tau, reduction="none",
                         impl=impl).float()


def select_rows(adv, G, topk=1):
    """Rows [n = B/G * k] of the top-k trajectories by advantage per group of G (sorted); topk 0: all G."""
    A = adv.detach().float().view(-1, G)                             # [B/G, G]
    offs = torch.arange(0, A.numel(), G, device=A.device)[:, None]   # [B/G, 1] first row of a group
    return (A.topk(min(topk or G, G), dim=1).indices + offs).flatten().sort().values


def item_loss(h_T, item_emb, targets, adv, old_logp_item, G, topk=1, tau=0.02, eps_low=0.2,
              eps_high=0.28, mode="inbatch", E=None, exclude=None, reference_broadcast=False,
              impl="auto", negatives=None, weighting="advantage"):
    """Clipped surrogate on the item action of the top-`topk` trajectories (by advantage) per group.

    Shapes as in item_logprobs; adv [B], old_logp_item [B] (π_old of the item action, None: ratio 1).
    weighting "advantage" [paper]: the sum over the selected rows of -min(r·A⁺, clip(r)·A⁺) / B,
    A⁺ = max(A, 0); "uniform" (departure 12): A⁺ -> 1 and the mean over the selected rows, a plain
    cross-entropy on them.
    Returns (scalar loss, stats dict of floats; item_logp is the mean log π(v⁺) of the selected rows)."""
    B = h_T.shape[0]
    A = adv.detach().float()
    rows = select_rows(A, G, topk)                                   # [n]
    if reference_broadcast:
        # the reference: every row in the softmax, advantages of non-top-k rows zeroed, then the
        # (B,1) x (B,1,1) outer product and a mean over B×B
        rows_used = torch.arange(B, device=A.device)
        a = torch.zeros(B, device=A.device).index_copy(0, rows, A[rows])   # [B]
    else:   # departure 11: a selected chain never pushes away from the true item
        rows_used = rows
        a = A[rows].clamp(min=0) if weighting == "advantage" else torch.ones_like(A[rows])
    logp = item_logprobs(h_T, item_emb, targets, tau, mode, E, exclude, rows_used, impl, negatives)  # [n]
    old = logp.detach() if old_logp_item is None else old_logp_item.detach().float()[rows_used]
    ratio = torch.exp(logp - old)[:, None]                           # [n, 1]
    per_row = _surrogate(ratio, a, eps_low, eps_high, reference_broadcast)   # [n,1] | [B,B,1]
    loss = per_row.mean() if reference_broadcast or weighting == "uniform" else per_row.sum() / B
    ones = torch.ones_like(ratio, dtype=torch.bool)
    clip_low, clip_high = _clip_fractions(ratio.detach(), a, ones, eps_low, eps_high)
    sel = logp.detach()[torch.isin(rows_used, rows)] if reference_broadcast else logp.detach()
    stats = {"item_loss": loss.item(), "item_logp": sel.mean().item(),
             "item_ratio_mean": ratio.detach().mean().item(),
             "item_clip_low": clip_low, "item_clip_high": clip_high}
    return loss, stats


# -----------------------------------------------------------------------------
# what RL practitioners watch, per step

def step_metrics(rw, adv, frac_zero_std, rollout, stats):
    """What a step's log records: rewards, zero-spread groups, advantage spread, losses (the item term as
    -log pi(v+) of the selected rows, which moves even where the surrogate sits at its ratio-1 value), clips,
    KL, entropy, lengths. A flat dict of floats; None where the run does not compute a quantity."""
    n = rollout["sampled_mask"].sum(1).float()                       # [B*G] sampled tokens per chain
    logp = stats.get("item_logp")
    return {"reward": rw["reward"].mean().item(), "reward_std": rw["reward"].std().item(),
            "r_d": rw["r_d"].mean().item(), "r_c": rw["r_c"].mean().item(),
            "rank_median": rw["rank"].float().median().item(), "frac_reward_zero_std": frac_zero_std,
            "adv_std": adv.std().item(), "item_nll": None if logp is None else -logp,
            **{k: stats.get(k) for k in ("token_loss", "item_clip_low", "item_clip_high", "grad_norm", "kl",
                                         "entropy")},
            # TRL's names where it has one:
            "clip_ratio/low_mean": stats.get("clip_low"), "clip_ratio/high_mean": stats.get("clip_high"),
            "completions/mean_length": n.mean().item(),
            "completions/clipped_ratio": rollout["cut"].float().mean().item()}


def format_metrics(m):
    """The one-line summary of a step's record (step_metrics + step, learning_rate, step_s, tokens_per_s)."""
    clip = m.get("clip_ratio/low_mean")
    return (f"step {m['step']} | reward {m['reward']:.4f} (R_d {m['r_d']:.4f} R_c {m['r_c']:.5f}) "
            f"zero-std {m['frac_reward_zero_std']:.2f} | tok_loss {m['token_loss']:.4f} "
            f"-log pi(v+) {m['item_nll']:.3f}" + (f" kl {m['kl']:.4f}" if m.get("kl") is not None else "")
            + (f" | clip {clip:.3f}/{m['clip_ratio/high_mean']:.3f}" if clip is not None else "")
            + f" | ent {m.get('entropy') or 0:.2f} | len {m['completions/mean_length']:.1f} cut "
            f"{m['completions/clipped_ratio']:.2f} | gnorm {m['grad_norm']:.3f} | "
            f"lr {m['learning_rate']:.2e} | {m['step_s']:.2f}s/step {m['tokens_per_s']:.0f} tok/s"
            + (f" | peak {m['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in m else ""))
