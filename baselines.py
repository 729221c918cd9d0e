"""Two reference recommenders, scored by eval.py under exactly the protocol R2ec is scored under.

    python baselines.py --dataset ml-100k          # ~3-5 min on 2 CPU cores

- popularity (eval.evaluate_popularity): rank every item by how often it is a target in the TRAIN split
  (nothing from valid/test). Many items share a count; the pessimistic tie rule puts the target after them.
- SASRec (Kang & McAuley 2018), small and hand-written: item + learned position embeddings, causal
  self-attention blocks, next-item prediction at every position, full-softmax cross-entropy over all
  items with the item table tied as the output layer; early stopping on valid NDCG@10.

How SASRec sees the data. Each train sample is (history of H items, target); its sequence
[hist..., target] has H+1 items and gives H next-item predictions. Consecutive samples of one user
overlap in all but one item, so training on every sample would predict each interaction ~H times per
epoch. An epoch instead takes, per user, every H-th train sample counted back from the user's last one
(a random phase per user and epoch): those windows tile the user's train sequence, so each train
interaction is predicted about once per epoch, always with its real preceding items as context.

At evaluation the model reads the sample's history (left-padded to H, most recent item in the last
slot, as in training) and the last position's hidden state is scored against the item table.

Writes the table as json to out/baselines/<dataset-slug>.json so train.py can print SASRec beside R2ec.
"""
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval as ev
import common


class BaselineError(common.UserError):
    """User-facing error: main() prints `error: <msg>` and exits 2."""


# --------------------------------------------------------------------------------------------------
# SASRec


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention + position-wise feed-forward."""

    def __init__(self, d, n_heads, dropout):
        super().__init__()
        self.n_heads, self.p = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask):                            # x [B,L,d], mask [B,1,L,L] True = attend
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, d // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, d)))              # [B,L,d]
        return x + self.drop(self.ff(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, num_items, max_len, d=64, n_blocks=2, n_heads=1, dropout=0.2):
        super().__init__()
        self.d = d
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)   # also the output layer (tied)
        self.pos_emb = nn.Embedding(max_len, d)                         # slot L-1 = most recent item
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, n_heads, dropout) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq):                                # seq [B,L] item ids, left-padded with 0
        B, L = seq.shape
        keep = (seq != 0)[..., None]                                                  # [B,L,1]
        x = self.item_emb(seq) * math.sqrt(self.d) + self.pos_emb(torch.arange(L, device=seq.device))
        x = self.drop(x) * keep
        # causal, and never attend to padding -- except each slot to itself, so that padded rows
        # (whose outputs are ignored) never get an all-masked softmax (NaN)
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=seq.device)
        mask = ((causal & keep.transpose(1, 2)) | eye)[:, None]                       # [B,1,L,L]
        for blk in self.blocks:
            x = blk(x, mask) * keep
        return self.ln_f(x)                                                           # [B,L,d]

    def user_states(self, hist):                           # hist [B,H] -> state after the last item
        return self.forward(hist)[:, -1]                                              # [B,d]


def epoch_windows(user, H, rng):
    """Train sample indices for one epoch: per user, every H-th sample counted back from the user's
    last one, shifted by a random phase in [0, min(H, #samples of the user)). Samples are
    time-sorted, so per user the index order is the time order."""
    order = np.lexsort((np.arange(len(user)), user))            # group by user, keep time order
    u = user[order]
    start = np.r_[0, np.flatnonzero(np.diff(u)) + 1]             # first position of each user group
    size = np.diff(np.r_[start, len(u)])
    from_end = np.repeat(start + size - 1, size) - np.arange(len(u))                 # 0 = user's last
    phase = rng.integers(0, np.minimum(H, size))            # < size: every user gets a window
    return order[(from_end % H) == np.repeat(phase, size)]


def sasrec_scorer(model, split, device):
    def user_fn(idx):
        return model.user_states(torch.from_numpy(split.hist[idx]).to(device))
    return user_fn


def evaluate_sasrec(model, dataset, split_name, device, batch_size=512, verbose=True, header=None,
                    impl="auto"):
    model.eval()
    split = ev.get_split(dataset, split_name)
    return ev.evaluate(dataset, split_name, sasrec_scorer(model, split, device), model.item_emb.weight,
                       batch_size=batch_size, desc=f"SASRec {split_name}", verbose=verbose, header=header,
                       impl=impl)


def train_sasrec(dataset, d=64, n_blocks=2, n_heads=1, dropout=0.2, lr=1e-3, weight_decay=0.0,
                 batch_size=128, epochs=40, patience=5, seed=0, device="cpu", verbose=True, log_fn=None,
                 impl="auto"):
    """Returns (model with the best-valid-NDCG@10 state restored, log dict)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tr = dataset.train
    H = tr.hist.shape[1]
    seqs = torch.from_numpy(np.concatenate([tr.hist, tr.target[:, None]], 1))          # [S, H+1]
    model = SASRec(dataset.num_items, H, d, n_blocks, n_heads, dropout).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, best_epoch, bad, history = -1.0, None, 0, 0, []
    bar = tqdm(range(1, epochs + 1), desc="SASRec", unit="epoch", disable=not verbose)
    for epoch in bar:
        model.train()
        win = rng.permutation(epoch_windows(tr.user, H, rng))
        tot, cnt = 0.0, 0
        for lo in range(0, len(win), batch_size):
            s = seqs[win[lo:lo + batch_size]].to(device)                              # [B, H+1]
            x, y = s[:, :-1], s[:, 1:]                     # predict item t+1 from items <= t
            h = model(x)                                                              # [B,H,d]
            m = x != 0                                     # no prediction from a padding slot
            logits = h[m] @ model.item_emb.weight[1:].T    # [P, N] full softmax, padding row dropped
            loss = F.cross_entropy(logits, y[m] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, cnt = tot + loss.item() * len(logits), cnt + len(logits)
        with torch.no_grad():
            val = evaluate_sasrec(model, dataset, "valid", device, verbose=False, header=False, impl=impl)
        history.append({"epoch": epoch, "loss": tot / max(cnt, 1), "valid_ndcg@10": val["ndcg@10"]})
        if log_fn is not None:
            log_fn(history[-1])
        if val["ndcg@10"] > best:
            best, best_epoch, bad = val["ndcg@10"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        bar.set_postfix(loss=f"{tot / max(cnt, 1):.3f}", val_ndcg10=f"{val['ndcg@10']:.4f}",
                        best=f"{best:.4f}@{best_epoch}")
        if bad >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return model, {"best_epoch": best_epoch, "best_valid_ndcg@10": best, "epochs_run": len(history),
                   "history": history}


# --------------------------------------------------------------------------------------------------
# CLI


def run(args):
    t0 = time.time()
    device = common.pick_device(args.device)
    common.check_kernels(args.impl, device, "--impl")
    common.check_out_dir(args.out_dir, "--out-dir")   # refused now, not after training
    if device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    dataset = data.load_for_run({"dataset": args.dataset, "history": args.history, "seed": args.seed},
                                args.data_dir)   # a synthetic-knowledge world: the one of --seed
    model, log = train_sasrec(dataset, d=args.dim, n_blocks=args.blocks, n_heads=args.heads,
                              dropout=args.dropout, lr=args.lr, weight_decay=args.weight_decay,
                              batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
                              seed=args.seed, device=device, impl=args.impl)
    print(f"SASRec: best valid NDCG@10 {log['best_valid_ndcg@10']:.4f} at epoch {log['best_epoch']} "
          f"({log['epochs_run']} epochs run, {time.time() - t0:.0f}s)")
    results, rows = {}, {}
    for split in ("valid", "test"):
        print(ev.protocol_header(dataset, split))
        results[split] = {"popularity": ev.evaluate_popularity(dataset, split, header=False, impl=args.impl),
                          "sasrec": evaluate_sasrec(model, dataset, split, device, header=False,
                                                    impl=args.impl)}
        rows[f"popularity ({split})"] = results[split]["popularity"]
        rows[f"SASRec ({split})"] = results[split]["sasrec"]
    print(ev.format_table(rows))
    out = os.path.join(args.out_dir, common.slug(dataset.name) + ".json")
    common.atomic_write(out, json.dumps({
        "dataset": dataset.name, "protocol": {s: ev.protocol_header(dataset, s) for s in results},
        "valid": results["valid"], "test": results["test"], "table": ev.format_table(rows),
        "sasrec": {k: v for k, v in log.items()}, "args": vars(args), "device": device,
        "seconds": round(time.time() - t0, 1)}, indent=1))
    print(f"wrote {out} ({time.time() - t0:.0f}s total)")
    return results


def get_parser():
    p = common.CLIParser(description="Popularity and SASRec baselines under the eval.py protocol.")
    # data
    p.add_argument("--dataset", default="ml-100k", help="dataset name, as for data.py (ml-100k, synthetic, ...)")
    p.add_argument("--data-dir", default=None, help="folder with the raw dataset files (see data.py)")
    p.add_argument("--history", type=common.pos_int, default=20, help="history window H of the samples [paper: 20]")
    # SASRec
    p.add_argument("--dim", type=common.pos_int, default=64, help="SASRec hidden size")
    p.add_argument("--blocks", type=common.pos_int, default=2, help="SASRec self-attention blocks")
    p.add_argument("--heads", type=common.pos_int, default=1, help="attention heads (must divide --dim)")
    p.add_argument("--dropout", type=common.unit_float, default=0.2, help="dropout on embeddings and blocks")
    p.add_argument("--lr", type=common.pos_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=common.nonneg_float, default=0.0, help="Adam weight decay")
    p.add_argument("--batch-size", type=common.pos_int, default=128, help="training sequences per step")
    p.add_argument("--epochs", type=common.pos_int, default=40, help="max epochs (each predicts every train interaction ~once)")
    p.add_argument("--patience", type=common.nonneg_int, default=5, help="stop after this many epochs without a better valid NDCG@10")
    # run
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=common.nonneg_int, default=1,
                   help="CPU threads for torch (0 = torch's default). 1 is the robust choice for this "
                        "small model: on an oversubscribed machine extra OpenMP threads stall every op")
    p.add_argument("--impl", default="auto", choices=["auto", "triton", "torch", "reference"],
                   help="catalog ranking path for evaluation (kernels/catalog.py); all give the same ranks")
    p.add_argument("--seed", type=common.nonneg_int, default=0, help="random seed")
    p.add_argument("--out-dir", default="out/baselines", help="where the json table goes")
    return p


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error(f"--heads {args.heads} must divide --dim {args.dim}")
    common.run_cli(run, args)


if __name__ == "__main__":
    main()
