"""Evaluation under one fixed protocol (SPEC §5).

Every number this project prints is computed here, the same way for every model:

- every sample of the split counts once (no user cap, no sampled negatives);
- each sample is scored against the FULL catalog, items 1..N;
- the sample's history items and the padding id 0 are masked (never ranked);
- the rank r of the target is 0-based and pessimistic: r = #{unmasked j != target : s_j >= s_target},
  so ties count against the model (a constant scorer gets r = N-1-#masked and scores 0);
  a target that sits inside its own history is masked too and counts as a miss (r = N+1);
- HR@K = 1[r < K], NDCG@K = 1[r < K] / log2(r + 2) (one relevant item), K in {5, 10, 20}.

Ranks are exact integers, computed per sample, so the metrics never depend on the batch size.

Two entry points:
- evaluate(dataset, split, user_fn, item_table): scores are dot products H[b] . E[j] / tau. The ranks
  come from kernels.catalog.catalog_stats, which walks the catalog in item chunks (never a full B x N
  logits matrix on the fused paths). This is what SASRec and R2ec's item head use.
- evaluate_scores(dataset, split, score_fn): any scorer score_fn(sample_idx, lo, hi) -> [B, hi-lo],
  walked in item chunks with the same masking and tie rule. For tests and scorers that are not H . E.

The second half of this file (the trained R2ec model: `python eval.py --ckpt DIR`) comes with the
RecPO issue.
"""
import math

import numpy as np
import torch
from tqdm import tqdm

from kernels.catalog import catalog_stats

KS = (5, 10, 20)


class EvalError(Exception):
    """User-facing evaluation error: CLIs print `error: <msg>` and exit 2."""


# --------------------------------------------------------------------------------------------------
# protocol: header, metrics, table


def _split(dataset, split_name):
    if split_name not in ("train", "valid", "test"):
        raise EvalError(f"eval.py: unknown split {split_name!r}; use train, valid or test")
    return dataset.split(split_name) if hasattr(dataset, "split") else getattr(dataset, split_name)


def protocol_header(dataset, split_name, ks=KS) -> str:
    """Two lines that say exactly what the numbers below them mean."""
    split = _split(dataset, split_name)
    n = dataset.num_items
    k = ", ".join(str(x) for x in ks)
    return (
        f"[eval] {dataset.name} | split={split_name} ({len(split):,} samples, all of them, no user cap) | "
        f"full catalog N={n:,} items (no sampled negatives) | masked: the sample's history items + padding id 0\n"
        f"[eval] rank r = #{{unmasked items != target with score >= target's}} (pessimistic: ties count against; "
        f"target inside its own history = miss) | HR@K = 1[r<K], NDCG@K = 1[r<K]/log2(r+2), K in ({k})"
    )


def metrics_from_ranks(ranks, ks=KS) -> dict:
    """ranks: 0-based pessimistic ranks [S] (numpy or torch). -> {"hr@5":.., "ndcg@5":.., ...}, means."""
    r = ranks.detach().cpu().numpy() if torch.is_tensor(ranks) else np.asarray(ranks)
    r = r.astype(np.float64).reshape(-1)
    if r.size == 0:
        raise EvalError("eval.py: no samples to evaluate (empty split)")
    out = {}
    for k in ks:
        hit = r < k                                                              # [S] bool
        out[f"hr@{k}"] = float(hit.mean())
        # np.where keeps log2 away from the huge ranks of misses; the value there is 0 anyway
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(np.where(hit, r, 0.0) + 2.0), 0.0).mean())
    return out


def format_table(rows, ks=KS) -> str:
    """rows: {name: metrics dict} -> markdown table with HR@K then NDCG@K columns."""
    cols = [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    head = "| model | " + " | ".join(c.upper() for c in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    lines = [head, sep]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# protocol: ranks over the full catalog


def _batches(S, batch_size, desc, verbose):
    if batch_size < 1:
        raise EvalError(f"eval.py: batch_size must be >= 1, got {batch_size}")
    starts = range(0, S, batch_size)
    return tqdm(starts, desc=desc, disable=not verbose, leave=False,
                total=math.ceil(S / batch_size), unit="batch")


def evaluate(dataset, split_name, user_fn, item_table, batch_size=256, tau=1.0, desc=None,
             verbose=True, header=None, impl="auto", return_ranks=False):
    """Exact pessimistic ranks of every sample of the split, with H . E / tau scores.

    user_fn(idx: int64 np.ndarray [B] of sample indices) -> H [B, d] torch tensor.
    item_table: E [N+1, d] torch tensor, row j = item id j (row 0 = padding, always masked).
    header: print protocol_header first (default: when verbose).
    Returns the metrics dict (and the int64 ranks [S] when return_ranks).
    """
    split = _split(dataset, split_name)
    E = item_table.detach()
    if E.dim() != 2 or E.shape[0] != dataset.num_items + 1:
        raise EvalError(f"eval.py: item_table must be [N+1, d] = [{dataset.num_items + 1}, d] "
                        f"(row 0 = padding), got {tuple(E.shape)}")
    if verbose if header is None else header:
        print(protocol_header(dataset, split_name))
    S = len(split)
    ranks = np.empty(S, dtype=np.int64)
    with torch.no_grad():
        for lo in _batches(S, batch_size, desc or f"eval {split_name}", verbose):
            idx = np.arange(lo, min(lo + batch_size, S))
            H = user_fn(idx).to(E.device)                                          # [B, d]
            tgt = torch.from_numpy(split.target[idx]).to(E.device)                 # [B]
            hist = torch.from_numpy(split.hist[idx]).to(E.device)                  # [B, Hw] 0-padded
            # catalog_stats masks padding + hist and walks the items in chunks itself
            st = catalog_stats(H, E, tgt, exclude=hist, tau=tau, impl=impl)
            ranks[idx] = st.rank.cpu().numpy()
    m = metrics_from_ranks(ranks)
    return (m, ranks) if return_ranks else m


def evaluate_scores(dataset, split_name, score_fn, batch_size=256, item_chunk=4096, desc=None,
                    verbose=True, header=None, return_ranks=False):
    """Same protocol for an arbitrary scorer: score_fn(idx [B], lo, hi) -> scores [B, hi-lo] for
    item ids lo..hi-1. Two passes over the catalog per batch (target scores, then counts), one
    [B, item_chunk] block at a time. NaN target scores count as misses."""
    split = _split(dataset, split_name)
    N1 = dataset.num_items + 1                      # rows 0..N, as in the item table
    if item_chunk < 1:
        raise EvalError(f"eval.py: item_chunk must be >= 1, got {item_chunk}")
    if verbose if header is None else header:
        print(protocol_header(dataset, split_name))
    S = len(split)
    ranks = np.empty(S, dtype=np.int64)
    chunks = [(lo, min(lo + item_chunk, N1)) for lo in range(0, N1, item_chunk)]
    with torch.no_grad():
        for lo in _batches(S, batch_size, desc or f"eval {split_name}", verbose):
            idx = np.arange(lo, min(lo + batch_size, S))
            B = len(idx)
            tgt = torch.from_numpy(split.target[idx]).long()                       # [B]
            hist = torch.from_numpy(split.hist[idx]).long()                        # [B, Hw]
            # pass 1: the target's own score
            ts = torch.full((B,), float("nan"), dtype=torch.float64)
            for a, b in chunks:
                inside = (tgt >= a) & (tgt < b)
                if inside.any():
                    s = torch.as_tensor(score_fn(idx, a, b)).cpu().double()         # [B, b-a]
                    ts[inside] = s[inside, tgt[inside] - a]
            # pass 2: count unmasked items scoring >= the target (pessimistic ties)
            rank = torch.zeros(B, dtype=torch.int64)
            for a, b in chunks:
                s = torch.as_tensor(score_fn(idx, a, b)).cpu().double()             # [B, C]
                C = b - a
                if s.shape != (B, C):
                    raise EvalError(f"eval.py: score_fn returned shape {tuple(s.shape)}, expected {(B, C)}")
                ids = torch.arange(a, b)                                           # [C]
                h = hist - a
                ok = (h >= 0) & (h < C)
                masked = torch.zeros(B, C, dtype=torch.int32)
                masked.scatter_add_(1, h.clamp(0, C - 1), ok.int())                # history in this chunk
                masked = (masked > 0) | (ids == 0)[None, :]                         # + padding
                beats = (s >= ts[:, None]) & ~masked & (ids[None, :] != tgt[:, None])
                rank += beats.sum(1)
            # target masked (inside its own history) or unscorable -> never a hit, like catalog_stats
            miss = (hist == tgt[:, None]).any(1) | torch.isnan(ts)
            ranks[idx] = torch.where(miss, torch.full_like(rank, N1), rank).numpy()
    m = metrics_from_ranks(ranks)
    return (m, ranks) if return_ranks else m


# --------------------------------------------------------------------------------------------------
# trained R2ec model
#
#   python eval.py --ckpt out/ml-100k/best [--split test|valid] [--batch-size 256]
#       re-scores a checkpoint exactly as train.py did (same one-pass greedy reasoning, same saved item
#       table), prints the protocol header, the metrics table and the latency per user
#   python eval.py --ckpt out/ml-100k/best --history "Star Wars (1977) | Fargo (1996) | Scream (1996)"
#       writes the reasoning for a hand-written history (titles or item ids, oldest first) and the top-10
#   The model-side functions (one-pass decoding, checkpoint loading) live in train.py.


def _find_items(spec, ds):
    """"title | title | ..." or "id | id" -> item ids; unknown titles: close matches, then EvalError."""
    import difflib
    titles = ds.titles
    by_title = {}
    for i, t in enumerate(titles[1:], 1):
        by_title.setdefault(t.lower(), i)
    ids = []
    for part in [p.strip() for p in spec.split("|") if p.strip()]:
        if part.isdigit():
            if not 1 <= int(part) <= ds.num_items:
                raise EvalError(f"--history: item id {part} is not in 1..{ds.num_items}")
            ids.append(int(part))
        elif part.lower() in by_title:
            ids.append(by_title[part.lower()])
        else:
            close = difflib.get_close_matches(part, titles[1:], n=3, cutoff=0.5)
            hint = f"; did you mean: {' | '.join(close)}" if close else "; use an exact title or an item id"
            raise EvalError(f"--history: unknown title {part!r}{hint}")
    if not ids:
        raise EvalError("--history is empty: give titles or item ids separated by '|'")
    return ids


def recommend(r, ds, cfg, ids, ratings=None, days_apart=1.0, k=10):
    """Reasoning and top-k items for one hand-written history (oldest first). -> (text, [(id, title, score)])."""
    import train
    H = ds.history
    ids = ids[-H:]
    n = len(ids)
    hist = np.zeros((1, H), np.int64)
    rat = np.zeros((1, H), np.float32)
    tim = np.zeros((1, H), np.int64)
    hist[0, H - n:] = ids
    rat[0, H - n:] = ratings[-n:] if ratings else 4.0
    t_now = 10 ** 9
    tim[0, H - n:] = [t_now - int(86400 * days_apart * (n - j)) for j in range(n)]
    keep = slice(-int(cfg["prompt_history"]), None)
    prompt = r.user_prompt_ids(hist[:, keep], rat[:, keep], tim[:, keep], np.array([t_now]))
    with torch.no_grad(), train.autocast(cfg["device"]):
        ro, h = train.decode(r, prompt, greedy=True,
                             max_new_tokens=0 if cfg.get("no_reasoning") else cfg["max_new_tokens"])
    text = r.decode_completions(ro)[0]
    E = r.table.E
    st = catalog_stats(h.to(E.device), E, torch.tensor([ids[-1]], device=E.device),
                       exclude=torch.from_numpy(hist).to(E.device), tau=r.tau, topk=k)
    top = [(int(i), ds.titles[int(i)], float(s)) for s, i in zip(st.topk_scores[0], st.topk_ids[0])]
    return text, top


def main(argv=None):
    import argparse
    import json
    import os
    import sys
    p = argparse.ArgumentParser(description="Score a trained R2ec checkpoint under the protocol, or recommend "
                                "for a hand-written history.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder written by train.py (e.g. out/ml-100k/best)")
    p.add_argument("--split", default="test", choices=("test", "valid"), help="split to score (all of it)")
    p.add_argument("--batch-size", type=int, default=None, help="users per greedy-reasoning batch "
                   "(default: the training run's --eval-batch-size; results do not depend on it)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--data-dir", default=None, help="raw data folder (default: the training run's)")
    p.add_argument("--history", default=None, help="'title | title | ...' or 'id | id | ...', oldest first: "
                   "print the reasoning and the top-10 instead of scoring a split")
    p.add_argument("--ratings", default=None, help="ratings of --history items, '5 | 4 | ...' (default 4 each)")
    p.add_argument("--days-apart", type=float, default=1.0, help="--history: days between consecutive items")
    args = p.parse_args(argv)
    try:
        import data
        import model as M
        import train
        if not os.path.isfile(os.path.join(args.ckpt, "run_config.json")):
            raise EvalError(f"--ckpt {args.ckpt}: not a checkpoint folder (no run_config.json); "
                            "train.py writes out/<dataset>/best and out/<dataset>/last")
        with open(os.path.join(args.ckpt, "run_config.json")) as f:
            cfg = json.load(f)
        dev = args.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        kw = {"num_users": cfg["synthetic_users"], "num_items": cfg["synthetic_items"]} \
            if cfg["dataset"] == "synthetic" else {}
        ds = data.load_dataset(cfg["dataset"], data_dir=args.data_dir or cfg.get("data_dir"),
                               history=cfg["history"], verbose=False, **kw)
        r, _ = train.load_for_eval(args.ckpt, dev, ds)
        cfg["device"] = dev
        if args.batch_size:
            cfg["eval_batch_size"] = args.batch_size
        if args.history:
            ids = _find_items(args.history, ds)
            ratings = [float(x) for x in args.ratings.split("|")] if args.ratings else None
            if ratings and len(ratings) != len(ids):
                raise EvalError(f"--ratings has {len(ratings)} values for {len(ids)} --history items")
            text, top = recommend(r, ds, cfg, ids, ratings, args.days_apart)
            print("history: " + " | ".join(ds.titles[i] for i in ids))
            print(f"reasoning ({cfg['max_new_tokens']} tokens max, greedy): {text!r}")
            print("top-10 (history masked):")
            for rank, (i, t, s) in enumerate(top, 1):
                print(f"{rank:>3}. {t}  (id {i}, score {s:.3f})")
            return
        print(protocol_header(ds, args.split))
        m, tm = train.evaluate_model(r, ds, args.split, cfg)
        print(format_table({f"R2ec ({os.path.basename(os.path.normpath(args.ckpt))})": m}))
        print(train.latency_line(tm))
    except (EvalError, M.ModelError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
