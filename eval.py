"""Evaluation under one fixed protocol (arXiv 2505.16994, §4 setup; full-catalog ranking). Every number this
project prints is computed here, the same way for every model:

- every sample of the split counts once (no user cap, no sampled negatives);
- each sample is scored against the FULL catalog, items 1..N;
- the sample's history items and the padding id 0 are masked (never ranked);
- the rank r of the target is 0-based and pessimistic: r = #{unmasked j != target : s_j >= s_target},
  so ties count against the model (a constant scorer gets r = N-1-#masked and scores 0);
  a target that sits inside its own history is masked too and counts as a miss (r = N+1), and so does
  a user state or target score that is not finite (NaN can never look good);
- HR@K = 1[r < K], NDCG@K = 1[r < K] / log2(r + 2) (one relevant item), K in {5, 10, 20}.
Ranks are exact integers, computed per sample, so the metrics never depend on the batch size.

This file owns the protocol (header, ranks, metrics, table), popularity, scoring a trained R2ec model or
checkpoint, and its CLI (--ckpt, --history, --plot). It imports nothing from train.py or baselines.py.
- evaluate(dataset, split, user_fn, item_table, idx=None): scores H[b] . E[j] / tau, ranked by
  kernels.catalog.catalog_stats (never a full B x N logits matrix on the fused paths); idx: a fixed subset.
- evaluate_scores(dataset, split, score_fn): any scorer score_fn(sample_idx, lo, hi) -> [B, hi-lo], walked in
  item chunks with the same masking and tie rule (tests, and scorers that are not H . E).
- evaluate_popularity(dataset, split, idx=None): items ranked by their train-split target counts.
- evaluate_model(r, dataset, split, cfg, idx=None): greedy reasoning -> h_T -> evaluate.

    python eval.py --ckpt out/ml-100k/best [--split test|valid] [--batch-size 256]
        re-scores a checkpoint exactly as train.py did (same one-pass greedy reasoning, same saved item
        table): protocol header, metrics table, latency per user
    torchrun --nproc_per_node 2 eval.py --ckpt out/ml-100k/best
        the same numbers, exactly: each process decodes a share of the batches, rank 0 prints
    python eval.py --ckpt out/ml-100k/best --history "Star Wars (1977) | Fargo (1996) | Scream (1996)"
        writes the reasoning for a hand-written history (titles or item ids, oldest first) and the top-10
    python eval.py --plot out/ml-100k
        draws the run's curves from its log.jsonl to out/ml-100k/curves.png (needs matplotlib)
"""
import difflib
import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import common
import data
from kernels.catalog import catalog_stats

KS = (5, 10, 20)


class EvalError(common.UserError):
    """User-facing evaluation error: CLIs print `error: <msg>` and exit 2."""


# ------------------------------------------------------------------------- protocol: header, metrics, table
def get_split(dataset, split_name):
    if split_name not in ("train", "valid", "test"):
        raise EvalError(f"eval.py: unknown split {split_name!r}; use train, valid or test")
    return dataset.split(split_name) if hasattr(dataset, "split") else getattr(dataset, split_name)


def protocol_header(dataset, split_name, ks=KS, subset=None) -> str:
    """Two lines that say exactly what the numbers below them mean. subset=(n, seed): a fixed subset."""
    split = get_split(dataset, split_name)
    n = dataset.num_items
    k = ", ".join(str(x) for x in ks)
    which = f"{len(split):,} samples, all of them, no user cap" if subset is None else \
        f"fixed subset: {subset[0]:,} of {len(split):,} samples, seed {subset[1]}"
    return (f"[eval] {dataset.name} | split={split_name} ({which}) | full catalog N={n:,} items "
            f"(no sampled negatives) | masked: the sample's history items + padding id 0\n"
            f"[eval] rank r = #{{unmasked items != target with score >= target's}} (pessimistic: ties count "
            f"against; target inside its own history = miss) | HR@K = 1[r<K], NDCG@K = 1[r<K]/log2(r+2), "
            f"K in ({k})")


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
    body = [f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |" for name, m in rows.items()]
    return "\n".join([head, sep] + body)


# -------------------------------------------------------------------- protocol: ranks over the full catalog
def _batches(S, batch_size, desc, verbose):
    if batch_size < 1:
        raise EvalError(f"eval.py: batch_size must be >= 1, got {batch_size}")
    return tqdm(range(0, S, batch_size), desc=desc, disable=not verbose, leave=False,
                total=math.ceil(S / batch_size), unit="batch")


def evaluate(dataset, split_name, user_fn, item_table, batch_size=256, tau=1.0, desc=None,
             verbose=True, header=None, impl="auto", return_ranks=False, idx=None):
    """Exact pessimistic ranks of every sample of the split (or of the samples idx), H . E / tau scores.
    user_fn(idx: int64 np.ndarray [B] of sample indices) -> H [B, d] torch tensor; item_table: E [N+1, d],
    row j = item id j (row 0 = padding, always masked); header: print protocol_header first (default: when
    verbose). -> the metrics dict (and the int64 ranks [S] when return_ranks)."""
    split = get_split(dataset, split_name)
    E = item_table.detach()
    if E.dim() != 2 or E.shape[0] != dataset.num_items + 1:
        raise EvalError(f"eval.py: item_table must be [N+1, d] = [{dataset.num_items + 1}, d] "
                        f"(row 0 = padding), got {tuple(E.shape)}")
    if verbose if header is None else header:
        print(protocol_header(dataset, split_name))
    pick = np.arange(len(split)) if idx is None else np.asarray(idx, dtype=np.int64)
    S = len(pick)
    ranks = np.empty(S, dtype=np.int64)
    with torch.no_grad():
        for lo in _batches(S, batch_size, desc or f"eval {split_name}", verbose):
            j = pick[lo:lo + batch_size]                                           # sample indices
            H = user_fn(j).to(E.device)                                            # [B, d]
            tgt = torch.from_numpy(split.target[j]).to(E.device)                   # [B]
            hist = torch.from_numpy(split.hist[j]).to(E.device)                    # [B, Hw] 0-padded
            # catalog_stats masks padding + hist and walks the items in chunks itself
            st = catalog_stats(H, E, tgt, exclude=hist, tau=tau, impl=impl)
            bad = ~torch.isfinite(H.float()).all(1) | ~torch.isfinite(st.target_logit)   # NaN: a miss
            ranks[lo:lo + len(j)] = torch.where(bad, E.shape[0], st.rank).cpu().numpy()
    m = metrics_from_ranks(ranks)
    return (m, ranks) if return_ranks else m


def evaluate_scores(dataset, split_name, score_fn, batch_size=256, item_chunk=4096, desc=None,
                    verbose=True, header=None, return_ranks=False):
    """Same protocol for an arbitrary scorer: score_fn(idx [B], lo, hi) -> scores [B, hi-lo] for
    item ids lo..hi-1. Two passes over the catalog per batch (target scores, then counts), one
    [B, item_chunk] block at a time. NaN target scores count as misses."""
    split = get_split(dataset, split_name)
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


# ------------------------------------------------------------------ popularity, and the saved baseline rows
def evaluate_popularity(dataset, split_name, batch_size=1024, verbose=True, header=None, impl="auto",
                        idx=None):
    """Items ranked by their train-split target counts. Scores = counts: H = ones [B,1], E = counts
    [N+1,1]; integer counts are exact in fp32, so equal counts stay ties and the pessimistic rule decides."""
    E = torch.from_numpy(dataset.train_counts().astype(np.float32))[:, None]     # [N+1, 1]
    return evaluate(dataset, split_name, lambda j: torch.ones(len(j), 1), E, batch_size=batch_size,
                    desc=f"popularity {split_name}", verbose=verbose, header=header, impl=impl, idx=idx)


def subset_idx(n, k, seed):
    """Sorted indices of a fixed seeded subset of k of n samples (k = 0 or k >= n: all of them)."""
    if not k or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def valid_subset(dataset, k, seed):
    """Indices of the fixed seeded subset of valid used for model selection (k = 0: all of it); prints its
    protocol header and popularity's numbers on it."""
    n = len(dataset.valid)
    idx = subset_idx(n, k, seed)
    print(protocol_header(dataset, "valid", subset=None if len(idx) == n else (len(idx), seed)))
    pop = evaluate_popularity(dataset, "valid", verbose=False, header=False, idx=idx)
    print(format_table({"popularity (valid" + (" subset)" if len(idx) < n else ")"): pop}))
    return idx


def baselines_path(dataset):
    """Where baselines.py writes its table and train.py reads SASRec's row."""
    return os.path.join("out", "baselines", common.slug(dataset.name) + ".json")


def baseline_rows(dataset, split_name="test"):
    """Popularity (computed here: cheap) and SASRec (if baselines.py has written its table) metrics."""
    rows = {"popularity": evaluate_popularity(dataset, split_name, verbose=False, header=False)}
    try:
        with open(baselines_path(dataset)) as f:
            saved = json.load(f)
        rows["SASRec"] = saved[split_name]["sasrec"]
    except (OSError, ValueError, KeyError, TypeError):
        pass   # baselines.py has not run (or its file is unreadable): popularity only
    return rows


# -------------------------------------- a trained R2ec model: greedy reasoning -> h_T -> full-catalog ranks
def evaluate_model(r, dataset, split_name, cfg, idx=None, verbose=True):
    """Metrics of samples idx (sorted; default all) of a split, and timings. cfg: the run's config
    (prompt_history, max_new_tokens, no_reasoning, eval_batch_size, kernels)."""
    split = get_split(dataset, split_name)
    idx = np.arange(len(split)) if idx is None else np.sort(np.asarray(idx, dtype=np.int64))
    prompts = r.split_prompt_ids(split, idx, cfg["prompt_history"])
    # torchrun: each process decodes a share of the batches; every process gets the whole H, bit for bit, and
    # ranks it (cheap next to decoding), so every process holds the exact single-process metrics
    H, tm = r.encode_users(prompts, 0 if cfg.get("no_reasoning") else cfg["max_new_tokens"],
                           cfg["eval_batch_size"], verbose, f"eval {split_name}: reasoning", shard=True)
    t0 = time.time()
    m = evaluate(dataset, split_name, lambda j: H[torch.from_numpy(np.searchsorted(idx, j))], r.table.E,
                 batch_size=1024, tau=r.tau, verbose=False, header=False, impl=cfg.get("kernels", "auto"),
                 idx=idx)
    tm.update(rank_s=time.time() - t0, n=len(idx))
    return m, tm


def evaluate_checkpoint(path, ds, split_name, device, batch_size=None, name=None, verbose=True,
                        baselines=True, samples=0, seed=0):
    """Load a checkpoint (no pickle) and score it on a split (samples > 0: a fixed seeded subset, said in the
    header, with popularity on the same subset): prints the protocol header, the table (beside popularity and
    SASRec when baselines) and the latency. -> (metrics, timings, table rows)."""
    r, cfg = checkpoint.load_checkpoint(path, device=device, dataset=ds)
    bs = cfg["eval_batch_size"] if batch_size is None else batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:   # an empty batch loop would leave H unset
        raise EvalError(f"--batch-size {bs!r}: must be an integer >= 1")
    cfg["eval_batch_size"] = bs
    n = len(get_split(ds, split_name))
    idx = subset_idx(n, samples, seed)
    print(protocol_header(ds, split_name, subset=None if len(idx) == n else (len(idx), seed)))
    m, tm = evaluate_model(r, ds, split_name, cfg, idx, verbose=verbose)
    rows = {name or f"R2ec ({os.path.basename(os.path.normpath(path))})": m,
            **(baseline_rows(ds, split_name) if baselines and len(idx) == n else {})}
    if len(idx) < n:
        pop = evaluate_popularity(ds, split_name, verbose=False, header=False, idx=idx)
        rows["popularity (same subset)"] = pop
    print(format_table(rows) + "\n" + latency_line(tm))
    return m, tm, rows


def examples_line(tm):
    """The greedy reasoning of the split's first samples, as written (this process's, under torchrun)."""
    ex = tm.get("examples") or {}
    return "".join(f"\n  reasoning, sample {i}: {ex[i]!r}" for i in sorted(ex))


def latency_line(tm):
    n = tm["n"]
    cut = f", {1 - tm.get('cut', 0) / n:.1%} wrote <answer> before the cap)" if tm["gen_tokens"] else ")"
    return (f"latency: reasoning + h_T (greedy, one cached pass) {1000 * tm['decode_s'] / n:.2f} ms/user, "
            f"full-catalog scoring {1000 * tm['rank_s'] / n:.3f} ms/user "
            f"({tm['gen_tokens'] / n:.1f} reasoning tokens/user{cut}" + examples_line(tm))


def find_items(spec, ds):
    """"title | title | ..." or "id | id" -> item ids; unknown titles: close matches, then EvalError."""
    titles = ds.titles
    by_title = {t.lower(): i for i, t in reversed(list(enumerate(titles[1:], 1)))}   # equal titles: the first
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


def parse_ratings(spec, n=None):
    """'5 | 4 | ...' -> floats in [0, 5], n of them when n is given (EvalError otherwise)."""
    try:
        out = [float(x) for x in spec.split("|")]
    except ValueError:
        raise EvalError(f"--ratings {spec!r}: give numbers separated by '|', e.g. '5 | 4 | 3'") from None
    if not all(0 <= x <= 5 for x in out):   # NaN fails this too
        raise EvalError(f"--ratings {spec!r}: every rating must be in [0, 5]")
    if n is not None and len(out) != n:
        raise EvalError(f"--ratings has {len(out)} values for {n} --history items")
    return out


def recommend(r, ds, cfg, ids, ratings=None, days_apart=1.0, k=10):
    """Reasoning and top-k items for a hand-written history (oldest first). -> (text, [(id, title, score)])"""
    H = ds.history
    ids = ids[-H:]
    n = len(ids)
    hist, rat, tim = np.zeros((1, H), np.int64), np.zeros((1, H), np.float32), np.zeros((1, H), np.int64)
    hist[0, H - n:] = ids
    rat[0, H - n:] = ratings[-n:] if ratings else 4.0
    t_now = 10 ** 9
    tim[0, H - n:] = [t_now - int(86400 * days_apart * (n - j)) for j in range(n)]
    keep = slice(-int(cfg["prompt_history"]), None)
    prompt = r.user_prompt_ids(hist[:, keep], rat[:, keep], tim[:, keep], np.array([t_now]))
    steps = 0 if cfg.get("no_reasoning") else cfg["max_new_tokens"]
    with common.autocast(r.device):
        ro, h = r.decode(prompt, greedy=True, max_new_tokens=steps)
    E = r.table.E
    st = catalog_stats(h.to(E.device), E, torch.tensor([ids[-1]], device=E.device),
                       exclude=torch.from_numpy(hist).to(E.device), tau=r.tau, topk=k)
    top = [(int(i), ds.titles[int(i)], float(s)) for s, i in zip(st.topk_scores[0], st.topk_ids[0])]
    return r.decode_completions(ro)[0], top


def final_cost(state, n_test, cfg, share):
    """Seconds to reserve for the final test pass: its estimate from the last measured valid pass, but never
    more than (1 - share) of the budget: training always gets its share, and a slow machine is reported."""
    last = next((e for e in reversed(state["evals"]) if "eval_n" in e), None)
    k = cfg.get("test_samples", 0)   # -1: no test pass, 0: all n_test samples, N: a subset of N
    # the test pass re-scores the saved item table: that pass's reasoning and ranking, not its table refresh
    per = last and (last.get("eval_decode_s", last["eval_s"]) + last.get("eval_rank_s", 0)) / last["eval_n"]
    est = 0 if k < 0 or not last else 1.15 * per * min(n_test, k or n_test) + 15
    cap = (1 - share) * cfg["time_budget"] * 60
    if est > cap > 0 and not state.get("slow_warned"):   # cap 0: no time budget, nothing to warn about
        state["slow_warned"] = True
        tqdm.write(f"warning: this machine is slower than expected: the test pass is estimated at "
                   f"{est:.0f}s, over the {cap:.0f}s the budget leaves it; training keeps {share:.0%} of the "
                   f"budget and the run will end about {est - cap:.0f}s late")
    return min(est, cap) if cap else est


def main(argv=None):
    p = common.CLIParser(description="Score a trained R2ec checkpoint under the protocol, or recommend for a "
                         "hand-written history.")
    p.add_argument("--ckpt", help="checkpoint folder written by train.py (e.g. out/ml-100k/best)")
    p.add_argument("--plot", metavar="RUN", help="instead: draw a run's curves (out/ml-100k) from its "
                   "log.jsonl to RUN/curves.png (needs the optional package matplotlib)")
    p.add_argument("--split", default="test", choices=("test", "valid"),
                   help="split to score (default all of it)")
    p.add_argument("--batch-size", type=common.pos_int, default=None, help="users per greedy-reasoning batch "
                   "(default: the training run's --eval-batch-size; results do not depend on it)")
    p.add_argument("--samples", type=common.nonneg_int, default=0, help="score a fixed seeded subset of N "
                   "samples of the split (said in the header; popularity on the same subset), 0 = all")
    p.add_argument("--seed", type=common.nonneg_int, default=0, help="seed of the --samples subset")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--data-dir", default=None, help="raw data folder (default: the training run's)")
    p.add_argument("--history", default=None, help="'title | title | ...' or 'id | id | ...', oldest first: "
                   "print the reasoning and the top-10 instead of scoring a split")
    p.add_argument("--ratings", default=None,
                   help="ratings of --history items, '5 | 4 | ...' (default 4 each)")
    p.add_argument("--days-apart", type=common.nonneg_float, default=1.0,
                   help="--history: days between consecutive items (at most 36500)")
    args = p.parse_args(argv)
    if not (args.ckpt or args.plot) or (args.ckpt and args.plot):
        p.error("give exactly one of --ckpt CKPT or --plot RUN")
    common.run_cli(plot_run if args.plot else run, args.plot or args)


CURVES = [("reward", "reward (mean of the G chains)"), ("token_loss", "token loss"),
          ("item_nll", "-log pi(v+) of the item head"), ("entropy", "sampled-token entropy (nats)"),
          ("completions/mean_length", "reasoning tokens"), ("val/ndcg@10", "valid NDCG@10 (greedy)")]


def plot_run(run_dir):
    """Curves of a run's log.jsonl over steps -> run_dir/curves.png (matplotlib, optional)."""
    path = os.path.join(run_dir, "log.jsonl")
    try:
        recs = [json.loads(x) for x in open(path) if x.strip()]
    except OSError:
        raise EvalError(f"--plot {run_dir}: no readable log.jsonl there "
                        "(train.py writes it into --out)") from None
    except ValueError as e:
        raise EvalError(f"{path}: not JSON lines ({e})") from None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError("--plot needs the optional package matplotlib (pip install matplotlib)") from None
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES):
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and "step" in r]
        ax.plot(*zip(*pts), marker="o" if key.startswith("val/") else None, ms=3) if pts else None
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    fig.suptitle(f"{os.path.normpath(run_dir)}: {sum('reward' in r for r in recs)} logged steps")
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out + ".tmp.png", dpi=90)
    os.replace(out + ".tmp.png", out)
    print(f"wrote {out}")


def run(args):
    # every flag is checked before anything is loaded: cheap checks first, the item lookups before the model
    if args.ratings and not args.history:
        raise EvalError("--ratings needs --history")
    if args.ratings:
        parse_ratings(args.ratings)
    if args.days_apart > 36500:
        raise EvalError(f"--days-apart {args.days_apart:g}: at most 36500 (100 years)")
    dev = common.pick_device(args.device)
    cfg = checkpoint.read_run_config(args.ckpt, need=tuple(checkpoint.RUN_CONFIG_KEYS))   # all scoring reads
    ds = data.load_for_run(cfg, args.data_dir, verbose=False)
    if not args.history:
        evaluate_checkpoint(args.ckpt, ds, args.split, dev, args.batch_size, verbose=common.is_main(),
                            baselines=False, samples=args.samples, seed=args.seed)
        return
    ids = find_items(args.history, ds)
    ratings = parse_ratings(args.ratings, len(ids)) if args.ratings else None
    r, cfg = checkpoint.load_checkpoint(args.ckpt, device=dev, dataset=ds)
    text, top = recommend(r, ds, cfg, ids, ratings, args.days_apart)
    print("history: " + " | ".join(ds.titles[i] for i in ids))
    print(f"reasoning ({cfg['max_new_tokens']} tokens max, greedy): {text!r}")
    print("top-10 (history masked):")
    for rank, (i, t, s) in enumerate(top, 1):
        print(f"{rank:>3}. {t}  (id {i}, score {s:.3f})")


if __name__ == "__main__":
    main()
