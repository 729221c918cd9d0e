"""Sparse, title-only look-alikes of a dataset, to develop defaults that generalize (issue: the CPU defaults were
tuned on ML-100K alone and did not learn on Amazon CDs: ~3k users, ~5.6k items, mean history 5.5, titles only).

    python bench/lookalike.py --dataset ml-100k --out data/lookalike-ml100k-sparse --keep 9 --seed 0
    python train.py --dataset csv:data/lookalike-ml100k-sparse

Writes the documented `csv:` format (interactions.csv + items.csv): per user, `--keep` interactions drawn at
random (kept in time order), item titles only (no description, so no genres). Seeded; nothing else changes.
"""
import csv
import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402


def main(argv=None):
    p = common.CLIParser(prog="bench/lookalike.py", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data-dir")
    p.add_argument("--out", required=True, help="folder for interactions.csv + items.csv")
    p.add_argument("--keep", type=common.pos_int, default=9, help="interactions kept per user (fewer: all of them)")
    p.add_argument("--seed", type=common.nonneg_int, default=0)
    a = p.parse_args(argv)
    ds = data.load_dataset(a.dataset, data_dir=a.data_dir, verbose=False)
    rng = np.random.default_rng(a.seed)
    # every interaction once: a user's last sample holds its whole (H-capped) history; rebuild the full sequences
    seqs = {}
    for s in (ds.train, ds.valid, ds.test):
        for u, i, t in zip(s.user, s.target, s.time):
            seqs.setdefault(int(u), []).append((int(t), int(i)))
    for s in (ds.train, ds.valid, ds.test):   # each user's first interaction is only ever a history item
        for u, h, ht in zip(s.user, s.hist, s.hist_time):
            first = [(int(t), int(i)) for i, t in zip(h, ht) if i]
            if first and first[0] not in seqs[int(u)]:
                seqs[int(u)].append(first[0])
    rows, used = [], set()
    for u, seq in sorted(seqs.items()):
        seq = sorted(set(seq))
        keep = sorted(rng.choice(len(seq), min(a.keep, len(seq)), replace=False))
        for k in keep:
            rows.append((f"u{u}", f"i{seq[k][1]}", seq[k][0]))
            used.add(seq[k][1])
    for name, head, body in (("interactions.csv", ["user", "item", "timestamp"], rows),
                             ("items.csv", ["item", "title"], [(f"i{i}", ds.items[i]["title"]) for i in sorted(used)])):
        buf = io.StringIO(newline="")
        csv.writer(buf).writerows([head] + body)
        common.atomic_write(os.path.join(a.out, name), buf.getvalue())
    print(f"{a.out}: {len(seqs):,} users, {len(used):,} items, {len(rows):,} interactions "
          f"({len(rows) / len(seqs):.1f} per user), titles only")


if __name__ == "__main__":
    common.run_cli(main)
