"""data.py: the sample/split protocol, leakage guards, every source from fixture files, bad inputs
(one-line errors, nothing written), cache (content-keyed, self-repairing)."""
import csv
import gzip
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import data
from data import DataError, load_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("R2EC_DATA_ROOT", str(root))
    return root


def write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def random_interactions(seed=0, users=30, items=25, per_user=(2, 14), tmax=40):
    """Random (user, item, rating, time) with MANY timestamp ties (small time range)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for _ in range(int(rng.integers(*per_user))):
            rows.append((f"u{u}", f"i{int(rng.integers(items))}", float(rng.integers(1, 6)),
                         int(1_600_000_000 + rng.integers(tmax))))
    return rows


def make_csv_dir(d, rows, titles=None, order=None):
    items = sorted({r[1] for r in rows})
    if order is not None:
        rows = [rows[k] for k in order]
    write_csv(os.path.join(d, "interactions.csv"), ["user", "item", "timestamp", "rating"],
              [(u, i, t, r) for u, i, r, t in rows])
    write_csv(os.path.join(d, "items.csv"), ["item", "title", "description"],
              [(i, (titles or {}).get(i, f"Title, of {i}"), f"about {i}") for i in items])
    return f"csv:{d}"


def reference_samples(rows, H):
    """Independent re-implementation of the protocol (temporal split) with raw ids, in pure Python."""
    key = lambda u, i: int.from_bytes(hashlib.blake2b(f"{u}\x1f{i}".encode(), digest_size=8).digest(),
                                      "little") >> 1
    by_user = {}
    for u, i, r, t in rows:
        by_user.setdefault(u, []).append((t, key(u, i), r, i))
    samples = []
    for u, seq in by_user.items():
        seq.sort()
        for p in range(1, len(seq)):
            prev = seq[max(0, p - H):p]
            t, k, r, i = seq[p]
            samples.append(((t, k), u, [x[3] for x in prev], [x[0] for x in prev], i, r))
    samples.sort(key=lambda s: s[0])
    return samples


def raw_view(ds, sp):
    """Samples of a split expressed in raw ids (to compare across relabellings)."""
    raw = [it.get("raw_id") for it in ds.items]
    out = []
    for k in range(len(sp)):
        h = [raw[x] for x in sp.hist[k] if x]
        ht = [int(x) for x in sp.hist_time[k] if x]
        out.append((int(sp.user[k]), tuple(h), tuple(ht), raw[sp.target[k]], int(sp.time[k]),
                    float(sp.rating[k])))
    return out


# ----------------------------------------------------------------------------- protocol

@pytest.mark.parametrize("H", [1, 3, 20])
def test_samples_match_reference_and_split_sizes(tmp_path, H):
    rows = random_interactions(seed=H)
    ds = load_dataset(make_csv_dir(tmp_path / "d", rows), history=H, verbose=False)
    ref = reference_samples(rows, H)
    S = len(ref)
    assert [len(ds.train), len(ds.valid), len(ds.test)] == [int(0.8 * S), int(0.9 * S) - int(0.8 * S),
                                                            S - int(0.9 * S)]
    got = raw_view(ds, ds.train) + raw_view(ds, ds.valid) + raw_view(ds, ds.test)
    users = sorted({r[0] for r in rows}, key=lambda s: s)  # non-integer ids: string order
    want = [(users.index(u), tuple(h), tuple(ht), i, tk[0], r) for tk, u, h, ht, i, r in ref]
    assert got == want
    # shapes, dtypes, padding on the left, history times never after the target
    for sp in (ds.train, ds.valid, ds.test):
        assert sp.hist.shape == (len(sp), H) and sp.hist.dtype == np.int64
        assert sp.hist_rating.dtype == np.float32 and sp.time.dtype == np.int64
        n = (sp.hist > 0).sum(1)
        assert all((sp.hist[k, :H - n[k]] == 0).all() and (sp.hist[k, H - n[k]:] > 0).all()
                   for k in range(len(sp)))
        assert ((sp.hist_time <= sp.time[:, None]) | (sp.hist == 0)).all()
        assert ((sp.hist_time == 0) == (sp.hist == 0)).all()
    assert ds.train.time.max() <= ds.valid.time.min() and ds.valid.time.max() <= ds.test.time.min()


def test_leakage_guards_synthetic():
    ds = load_dataset("synthetic", verbose=False)
    assert ds.test.time.min() >= ds.train.time.max()  # no test target earlier than a train target
    # A history is strictly the user's previous interactions: walk each user's full sequence.
    allsp = [ds.train, ds.valid, ds.test]
    u = np.concatenate([s.user for s in allsp]); t = np.concatenate([s.time for s in allsp])
    tg = np.concatenate([s.target for s in allsp]); h = np.concatenate([s.hist for s in allsp])
    ht = np.concatenate([s.hist_time for s in allsp])
    for user in range(0, ds.num_users, 37):
        idx = np.flatnonzero(u == user)
        idx = idx[np.argsort(t[idx], kind="stable")]
        seq = [x for x in h[idx[0]] if x] + [tg[idx[0]]]
        for k in idx[1:]:
            assert list(h[k][h[k] > 0]) == seq[-ds.history:]  # never includes its own target row
            assert (ht[k][h[k] > 0] <= t[k]).all()
            seq.append(tg[k])


def test_ids_and_ties_independent_of_item_order(tmp_path):
    rows = random_interactions(seed=5)
    a = load_dataset(make_csv_dir(tmp_path / "a", rows), verbose=False)
    # Same data, rows shuffled: identical output.
    perm = np.random.default_rng(1).permutation(len(rows))
    b = load_dataset(make_csv_dir(tmp_path / "b", rows, order=perm), verbose=False)
    for s in data.SPLITS:
        for f in data.FIELDS:
            np.testing.assert_array_equal(getattr(a.split(s), f), getattr(b.split(s), f))
    # Item ids follow sorted raw ids, not first appearance.
    assert [it["raw_id"] for it in a.items[1:]] == sorted({r[1] for r in rows})
    # Numeric raw ids sort numerically ("10" after "9"); reversing the id order only relabels
    # (no timestamp ties here: with ties the hash of the raw ids decides, checked above).
    rows = random_interactions(seed=5, tmax=10**6)
    num = [(u, str(int(i[1:]) + 1), r, t) for u, i, r, t in rows]
    rev = [(u, str(1000 - int(i[1:])), r, t) for u, i, r, t in rows]
    c = load_dataset(make_csv_dir(tmp_path / "c", num), verbose=False)
    d = load_dataset(make_csv_dir(tmp_path / "d", rev), verbose=False)
    assert [int(it["raw_id"]) for it in c.items[1:]] == sorted({int(r[1]) for r in num})
    assert c.items[1]["raw_id"] == "1" and d.items[1]["raw_id"] == str(1000 - 24)
    back = lambda ds, m: sorted((u, tuple(m(x) for x in h), ht, m(tg), t, r) for u, h, ht, tg, t, r in
                                raw_view(ds, ds.train) + raw_view(ds, ds.valid) + raw_view(ds, ds.test))
    assert back(c, lambda r: int(r) - 1) == back(d, lambda r: 1000 - int(r))
    for s in data.SPLITS:  # same split membership (by time), same sizes
        np.testing.assert_array_equal(np.sort(c.split(s).time), np.sort(d.split(s).time))


def test_no_feature_built_from_target(tmp_path):
    rows = random_interactions(seed=2, tmax=10**6)  # unique-ish times
    base = load_dataset(make_csv_dir(tmp_path / "a", rows), verbose=False)
    # Change the rating and item of one user's LAST interaction (a target, in no history).
    last = max((k for k, r in enumerate(rows) if r[0] == "u3"), key=lambda k: rows[k][3])
    other = next(r[1] for r in rows if r[1] != rows[last][1])
    mod = list(rows)
    u, i, r, t = rows[last]
    mod[last] = (u, other, 6.0 - r if r != 3 else 5.0, t)
    if sum(1 for x in rows if x[1] == i) == 1:
        pytest.skip("item used once")  # the catalog would change
    ds = load_dataset(make_csv_dir(tmp_path / "b", mod), verbose=False)
    diffs = 0
    for s in data.SPLITS:
        a, b = base.split(s), ds.split(s)
        for f in ["user", "hist", "hist_rating", "hist_time", "time"]:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        diffs += int((a.target != b.target).sum() + (a.rating != b.rating).sum())
    assert diffs == 2  # only that sample's target and rating moved


def test_loo_split(tmp_path):
    rows = random_interactions(seed=3, tmax=10**6)
    ds = load_dataset(make_csv_dir(tmp_path / "a", rows), split="loo", verbose=False)
    S = len(reference_samples(rows, 20))
    assert len(ds.train) + len(ds.valid) + len(ds.test) == S
    assert len(ds.test) == ds.num_users and len(set(ds.test.user.tolist())) == ds.num_users
    for sp_late, sp_early in ((ds.test, ds.valid), (ds.valid, ds.train)):
        last = {int(u): int(t) for u, t in zip(sp_late.user, sp_late.time)}
        assert all(t <= last[int(u)] for u, t in zip(sp_early.user, sp_early.time) if int(u) in last)


def test_synthetic_deterministic_fast_and_structured(tmp_path):
    t0 = time.time()
    a = load_dataset("synthetic", verbose=False, cache_dir=str(tmp_path / "x"))
    assert time.time() - t0 < 2.0
    b = load_dataset("synthetic", verbose=False, cache_dir=str(tmp_path / "y"))
    c = load_dataset("synthetic", verbose=False, seed=1, cache_dir=str(tmp_path / "y"))
    np.testing.assert_array_equal(a.train.hist, b.train.hist)
    assert a.titles == b.titles and a.titles != c.titles
    assert a.num_users == 600 and a.num_items == 400 and a.titles[0] == ""
    assert len(set(a.titles[1:])) == 400 and a.titles[1].endswith(")")
    assert a.domain["item"] == "movie" and set(a.stats["samples"]) == set(data.SPLITS)
    # Planted sequential structure: last item's most frequent train successor beats popularity.
    N, te = a.num_items, a.test
    B = np.zeros((N + 1, N + 1))
    np.add.at(B, (a.train.hist[:, -1], a.train.target), 1)
    pop = a.train_counts().astype(float)

    def hr10(scores):
        s = scores.copy()
        s[:, 0] = -np.inf
        np.put_along_axis(s, te.hist, -np.inf, 1)
        tgt = np.take_along_axis(s, te.target[:, None], 1)
        return float(((s >= tgt).sum(1) - 1 < 10).mean())

    assert hr10(B[te.hist[:, -1]] + 1e-6 * pop) > hr10(np.tile(pop, (len(te), 1))) + 0.3


# ----------------------------------------------------------------------------- sources

UITEM = ["1|Crimson Harbor (1987)|01-Jan-1987||http://x|0|1|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
         "2|Misérables, Les (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0",
         "10|Silent River (1990)|01-Jan-1990||http://x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0"]
UDATA = [("7", "2", 4, 881250949), ("7", "1", 3, 881250950), ("7", "10", 5, 881250951),
         ("3", "10", 2, 881250940), ("3", "1", 1, 881250960)]


def write_udata(d):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "u.data"), "w") as f:
        f.writelines(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in UDATA)
    with open(os.path.join(d, "u.item"), "wb") as f:
        f.write(("\n".join(UITEM) + "\n").encode("latin-1"))


def write_recbole(d):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "ml-100k.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        f.writelines(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in UDATA)
    with open(os.path.join(d, "ml-100k.item"), "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                "1\tCrimson Harbor\t1987\tAction Comedy\n2\tMisérables, Les\t1995\tDrama\n"
                "10\tSilent River\t1990\tWar\n")


def test_movielens_udata_and_recbole_agree(tmp_path):
    write_udata(tmp_path / "u")
    write_recbole(tmp_path / "r")
    a = load_dataset("ml-100k", data_dir=str(tmp_path / "u"), history=2, verbose=False)
    b = load_dataset("ml-100k", data_dir=str(tmp_path / "r"), history=2, verbose=False)
    assert a.titles == b.titles == ["", "Crimson Harbor (1987)", "Misérables, Les (1995)",
                                    "Silent River (1990)"]
    assert a.items[1]["description"] == b.items[1]["description"] == "Genres: Action, Comedy."
    assert a.num_users == 2 and a.num_items == 3 and a.domain["verb"] == "watch"
    for s in data.SPLITS:
        for f in data.FIELDS:
            np.testing.assert_array_equal(getattr(a.split(s), f), getattr(b.split(s), f))
    allt = np.concatenate([a.train.target, a.valid.target, a.test.target])
    allh = np.concatenate([a.train.hist, a.valid.hist, a.test.hist])
    # user "3" (index 0): 10 then 1; user "7": 2, 1, 10 -> global order by time
    assert allt.tolist() == [1, 3, 1] and allh.tolist() == [[0, 2], [2, 1], [0, 3]]
    assert a.split("train").time.dtype == np.int64 and a.train.time[0] == 881250950


def test_ml1m_and_mllatest(tmp_path):
    d = tmp_path / "m1"
    os.makedirs(d)
    (d / "ratings.dat").write_text("1::5::4::978300760\n1::9::3::978300761\n2::5::5::978300700\n")
    (d / "movies.dat").write_bytes("5::Café (1999)::Comedy|Drama\n9::Heat (1995)::Action\n"
                                   .encode("latin-1"))
    a = load_dataset("ml-1m", data_dir=str(d), verbose=False)
    assert a.titles == ["", "Café (1999)", "Heat (1995)"] and len(a.train) + len(a.test) + len(a.valid) == 1
    assert a.items[1]["description"] == "Genres: Comedy, Drama."
    d2 = tmp_path / "ml"
    write_csv(str(d2 / "ratings.csv"), ["userId", "movieId", "rating", "timestamp"],
              [(1, 5, 4.5, 978300760), (1, 9, 3, 978300761)])
    write_csv(str(d2 / "movies.csv"), ["movieId", "title", "genres"],
              [(5, "Toy Story, The (1995)", "Animation|Comedy"), (9, "X (2000)", "(no genres listed)")])
    b = load_dataset("ml-latest-small", data_dir=str(d2), verbose=False)
    assert b.titles[1] == "Toy Story, The (1995)" and b.items[2]["description"] == ""
    assert float(np.concatenate([b.train.rating, b.valid.rating, b.test.rating])[0]) == 3.0


def ms(day):
    return int(time.mktime(time.strptime(day, "%Y-%m-%d")) - time.timezone) * 1000


def write_amazon(d, cat="Video_Games", gz=True, extra_rows=()):
    os.makedirs(d, exist_ok=True)
    long_desc = " ".join(f"w{k}" for k in range(150))
    meta = [
        {"parent_asin": "A1", "title": "Super Game &amp; Friends", "price": 19.99, "average_rating": 4.5,
         "rating_number": 12, "description": ["<b>Great</b> fun", "Great fun", "caf\u00e9 time"]},
        {"parent_asin": "A2", "title": "Racing Pro", "price": "5.00", "description": [long_desc]},
        {"parent_asin": "A3", "title": "Bad price", "price": None},
        {"parent_asin": "A4", "title": "<span id='x'>Spam</span>", "price": 3},
        {"parent_asin": "A5", "title": "X", "price": 3},
        {"parent_asin": "A6", "title": " ".join(["word"] * 21), "price": 3},
        {"parent_asin": "A7", "price": 3},
        {"parent_asin": "A8", "title": "Puzzle Box", "price": 7},
        {"parent_asin": "Z9", "title": "Never rated", "price": 1},
    ]
    rows = [("U1", "A1", 5.0, ms("2023-01-05")), ("U1", "A2", 4.0, ms("2023-01-06")),
            ("U1", "A3", 4.0, ms("2023-01-07")), ("U1", "A8", 3.0, ms("2023-02-01")),
            ("U2", "A2", 2.0, ms("2023-03-01")), ("U2", "A1", 1.0, ms("2023-03-02")),
            ("U2", "A4", 1.0, ms("2023-03-02")), ("U2", "A5", 1.0, ms("2023-03-03")),
            ("U2", "A6", 1.0, ms("2023-03-04")), ("U2", "A7", 1.0, ms("2023-03-05")),
            ("U2", "NOMETA", 1.0, ms("2023-03-06")), ("U3", "A1", 3.0, ms("2022-01-10")),
            ("U3", "A8", 3.0, ms("2022-01-11")), ("U2", "A8", 3.0, ms("2023-11-01"))] + list(extra_rows)
    text = "user_id,parent_asin,rating,timestamp\n" + "".join(f"{u},{a},{r},{t}\n" for u, a, r, t in rows)
    mtext = "".join(json.dumps(m) + "\n" for m in meta)
    op = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    with op(os.path.join(d, f"{cat}.csv" + (".gz" if gz else ""))) as f:
        f.write(text)
    with op(os.path.join(d, f"meta_{cat}.jsonl" + (".gz" if gz else ""))) as f:
        f.write(mtext)


def test_amazon_filters_window_and_text(tmp_path, capsys):
    write_amazon(tmp_path / "am")
    ds = load_dataset("amazon-2023:Video_Games", data_dir=str(tmp_path / "am"))
    out = capsys.readouterr().out
    f = ds.stats["filters"]
    assert f["items without metadata"] == 1 and f["price missing or not a number"] == 1
    assert f["title contains '<span id'"] == 1 and f["title <= 1 character"] == 1
    assert f["title > 20 words"] == 1 and f["title missing"] == 1
    assert f["interactions of removed items"] == 6
    # < 10,000 items: window moved back to the data start (2022-01-10); 2023-11-01 is past the end
    win = [k for k in f if k.startswith("interactions outside window")]
    assert win == ["interactions outside window [2022-01-10, 2023-10-01)"] and f[win[0]] == 1
    assert "interactions of removed items: 6 removed" in out
    assert ds.titles == ["", "Super Game & Friends", "Racing Pro", "Puzzle Box"]
    assert ds.items[1]["description"] == "Great fun caf time"
    assert ds.items[1]["average_rating"] == 4.5 and ds.items[1]["rating_number"] == 12
    assert len(ds.items[2]["description"].split()) == 100 and ds.items[2]["average_rating"] is None
    assert ds.domain == {"item": "video game", "items": "video games", "verb": "play"}
    assert ds.num_users == 3 and ds.stats["interactions"] == 7
    t = np.concatenate([ds.train.time, ds.valid.time, ds.test.time])
    assert t.max() < 1_700_000_000  # seconds, not ms


def test_amazon_window_moves_back_in_3_month_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "AMAZON_MIN_ITEMS", 2)
    write_amazon(tmp_path / "am", gz=False)
    ds = load_dataset("amazon-2023:Video_Games", data_dir=str(tmp_path / "am"), verbose=False)
    # [2022-10-01, ..) holds A1, A2, A8 (>= 2 items): no move; U3's 2022-01 rows are outside.
    assert ds.stats["filters"]["interactions outside window [2022-10-01, 2023-10-01)"] == 3
    monkeypatch.setattr(data, "AMAZON_MIN_ITEMS", 4)  # never reached: back to the data start
    ds = load_dataset("amazon-2023:Video_Games", data_dir=str(tmp_path / "am"), verbose=False)
    assert "interactions outside window [2022-01-10, 2023-10-01)" in ds.stats["filters"]


def test_csv_source_and_domain(tmp_path):
    d = tmp_path / "c"
    write_csv(str(d / "interactions.csv"), ["user", "item", "timestamp"],
              [("a", "x", 10.7), ("a", "y", 20), ("b", "y", 5), ("b", "x", 30)])
    write_csv(str(d / "items.csv"), ["item", "title"], [("x", "A, quoted \"title\""), ("y", "Other"),
                                                         ("z", "unused")])
    ds = load_dataset(f"csv:{d}", verbose=False)
    assert ds.titles == ["", 'A, quoted "title"', "Other"] and ds.items[1]["description"] == ""
    assert ds.domain == data.DOMAINS[""] and ds.stats["filters"] == {
        "metadata items without interactions (not in catalog)": 1}
    allt = np.concatenate([ds.train.time, ds.valid.time, ds.test.time])
    assert sorted(allt.tolist()) == [20, 30]
    assert ds.train_counts().shape == (3,) and ds.train_counts().sum() == len(ds.train)


# ----------------------------------------------------------------------------- bad input

def bad_csv(tmp_path, inter, items="item,title\nx,T1\ny,T2\n"):
    d = tmp_path / "bad"
    os.makedirs(d, exist_ok=True)
    (d / "interactions.csv").write_text(inter)
    (d / "items.csv").write_text(items)
    return f"csv:{d}"


UIT, UITR = "user,item,timestamp\n", "user,item,timestamp,rating\n"  # interactions.csv headers
CSV_CASES = [  # (interactions.csv, items.csv, expected fragments)
    ("user,item,timestamp\na,x,1\na,y\n", None, ["interactions.csv:3", "truncated"]),
    ("user,item\na,x\n", None, ["interactions.csv:1", "missing column 'timestamp'"]),
    ("user,item,timestamp\na,x,1\na,y,yesterday\n", None, ["interactions.csv:3", "timestamp 'yesterday'"]),
    ("user,item,timestamp,rating\na,x,1,good\n", None, ["interactions.csv:2", "rating 'good'"]),
    ("user,item,timestamp\na,x,1\na,q,2\nb,q,3\n", None, ["interactions.csv:3", "2 interactions", "'q'"]),
    ("user,item,timestamp\na,x,1\n", "item,title\nx,\n", ["items.csv:2", "empty title"]),
    ("user,item,timestamp\na,x,1\nb,y,2\n", None, ["no samples"]),
    ("", None, ["interactions.csv", "empty", "user,item,timestamp[,rating]"]),
    (None, None, None),  # not UTF-8 (bytes written below)
    # timestamps outside [1970, 2100) in seconds
    (UIT + "a,x,1\na,y,1e17\n", None, ["interactions.csv:3", "timestamp '1e17'", "[1970, 2100)"]),
    ("user,item,timestamp\na,x,1e30\na,y,2\n", None, ["interactions.csv:2", "timestamp '1e30'"]),
    ("user,item,timestamp\na,x,-5\na,y,2\n", None, ["interactions.csv:2", "timestamp '-5'"]),
    (UIT + "a,x,1600000000000\na,y,2\n", None, ["interactions.csv:2", "looks like milliseconds"]),
    # ratings: not a number / NaN / inf / beyond float32
    (UITR + "a,x,1,3\na,y,2,nan\n", None, ["interactions.csv:3", "rating 'nan' is not finite"]),
    (UITR + "a,x,1,-inf\na,y,2,3\n", None, ["interactions.csv:2", "rating '-inf' is not finite"]),
    (UITR + "a,x,1,1e39\na,y,2,3\n", None, ["interactions.csv:2", "rating '1e39'", "range"]),
    # headers: unknown column (named, accepted header shown), repeated column, no header at all
    ("user,item,timestamp,genre\na,x,1,g\na,y,2,g\n", None,
     ["interactions.csv:1", "unknown column 'genre'", "accepted header: user,item,timestamp[,rating]"]),
    ("user,item,timestamp\na,x,1\na,y,2\n", "item,title,year\nx,T,1\ny,U,2\n",
     ["items.csv:1", "unknown column 'year'", "accepted header: item,title[,description]"]),
    (UIT[:-1] + ",user\na,x,1,b\na,y,2,b\n", None, ["interactions.csv:1", "column 'user' appears twice"]),
    ("a,x,1\na,y,2\n", None, ["interactions.csv:1", "missing column 'user'", "expected a header line"]),
    ("user,item,timestamp\na,x,1\na,y,2\n", "x,T1\ny,T2\n", ["items.csv:1", "missing column 'item'"]),
    # items.csv: empty, header only, conflicting repeated row, unquoted comma, empty id
    ("user,item,timestamp\na,x,1\na,y,2\n", "\n", ["items.csv", "file is empty", "item,title"]),
    ("user,item,timestamp\na,x,1\na,y,2\n", "item,title\n", ["items.csv", "no items"]),
    ("user,item,timestamp\na,x,1\na,y,2\n", "item,title\nx,T1\ny,T2\nx,Other\n",
     ["items.csv:4", "item 'x' repeats line 2 with a different title"]),
    ("user,item,timestamp\na,x,1\na,y,2\n", "item,title\nx,Hello, World\ny,T2\n",
     ["items.csv:2", "expected 2 fields", "got 3", "unquoted"]),
    (UIT + "a,,1\na,y,2\n", "item,title\n,T1\ny,T2\n", ["interactions.csv:2", "empty item id"]),
    ("user,item,timestamp\n,x,1\na,y,2\n", None, ["interactions.csv:2", "empty user id"]),
    ("user,item,timestamp\na,x,1,2\na,y,2\n", None, ["interactions.csv:2", "expected 3 fields", "got 4"]),
]


@pytest.mark.parametrize("case", range(len(CSV_CASES)))
def test_bad_csv_inputs(tmp_path, case):
    inter, items, frags = CSV_CASES[case]
    if frags is None:  # not UTF-8
        d = tmp_path / "bad"
        os.makedirs(d)
        (d / "interactions.csv").write_bytes(b"user,item,timestamp\n\xff\xfe,x,1\n")
        (d / "items.csv").write_text("item,title\nx,T\n")
        name, frags = f"csv:{d}", ["interactions.csv", "not utf-8 text"]
    else:
        name = bad_csv(tmp_path, inter, *([items] if items else []))
    with pytest.raises(DataError) as e:
        load_dataset(name, verbose=False)
    msg = str(e.value)
    assert "\n" not in msg and all(f.lower() in msg.lower() for f in frags), msg
    assert not os.path.exists(os.environ["R2EC_DATA_ROOT"])  # nothing written


def test_identical_repeated_item_row_is_ignored(tmp_path):
    name = bad_csv(tmp_path, "user,item,timestamp\na,x,1\na,y,2\n", "item,title\nx,T1\ny,T2\nx,T1\n")
    ds = load_dataset(name, verbose=False)
    assert ds.titles == ["", "T1", "T2"]
    assert ds.stats["filters"] == {"repeated identical item rows (ignored)": 1}


def test_integer_ids_beyond_int64_sort_numerically(tmp_path):
    big = str(2**64 + 5)  # int64 overflowed here before
    name = bad_csv(tmp_path, f"user,item,timestamp\n{big},{big},1\n{big},7,2\n-3,7,3\n-3,{big},4\n",
                   f"item,title\n{big},Big\n7,Seven\n")
    ds = load_dataset(name, verbose=False)
    assert [it["raw_id"] for it in ds.items[1:]] == ["7", big] and ds.num_users == 2
    ids, codes = data._index(["10", "9", big, "-" + big, "9"])
    assert ids == ["-" + big, "9", "10", big] and codes.tolist() == [2, 1, 3, 0, 1]
    ids, _ = data._index(["1" * 5000, "2"])  # too long for int(): string order, no crash
    assert ids == ["1" * 5000, "2"]


def test_bad_movielens_and_amazon_inputs(tmp_path):
    d = tmp_path / "u"
    write_udata(d)
    (d / "u.data").write_text("1\t1\t5\t881250949\n2\t1\n")
    with pytest.raises(DataError, match=r"u\.data:2: expected 4 fields"):
        load_dataset("ml-100k", data_dir=str(d), verbose=False)
    write_udata(d)
    (d / "u.data").write_text("1,1,5,881250949\n")  # wrong format (comma-separated)
    with pytest.raises(DataError, match=r"u\.data:1:"):
        load_dataset("ml-100k", data_dir=str(d), verbose=False)
    (d / "u.data").write_text("1\t1\t5\t881250949\t7\n")  # a fifth field
    with pytest.raises(DataError, match=r"u\.data:1: expected 4 fields \(.*\), got 5"):
        load_dataset("ml-100k", data_dir=str(d), verbose=False)
    (d / "u.data").write_text("1\t1\t5\t881250949\n1\t2\t5\t1e30\n")
    with pytest.raises(DataError, match=r"u\.data:2: timestamp '1e30' is not a date in \[1970, 2100\)"):
        load_dataset("ml-100k", data_dir=str(d), verbose=False)
    write_udata(d)
    (d / "u.data").write_text("1\t99\t5\t881250949\n")
    with pytest.raises(DataError, match=r"u\.data:1: 1 interactions refer to items absent from .*u\.item"):
        load_dataset("ml-100k", data_dir=str(d), verbose=False)
    write_recbole(tmp_path / "r")
    (tmp_path / "r" / "ml-100k.inter").write_text("user_id:token\titem_id:token\n1\t1\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter:1: missing column 'timestamp'"):
        load_dataset("ml-100k", data_dir=str(tmp_path / "r"), verbose=False)
    with pytest.raises(DataError, match="no MovieLens files"):
        load_dataset("ml-1m", data_dir=str(tmp_path), verbose=False)
    am = tmp_path / "am"
    write_amazon(am)
    (am / "Video_Games.csv.gz").write_text("user_id,parent_asin,rating,timestamp\n")
    with pytest.raises(DataError, match=r"Video_Games\.csv\.gz: not a gzip file"):
        load_dataset("amazon-2023:Video_Games", data_dir=str(am), verbose=False)
    write_amazon(am)
    with gzip.open(am / "meta_Video_Games.jsonl.gz", "wt") as f:
        f.write('{"parent_asin": "A1", "title": "ok", "price": 1}\n{"parent_asin": "A2", "tit\n')
    with pytest.raises(DataError, match=r"meta_Video_Games\.jsonl\.gz:2: not valid JSON"):
        load_dataset("amazon-2023:Video_Games", data_dir=str(am), verbose=False)
    write_amazon(am)
    blob = (am / "Video_Games.csv.gz").read_bytes()
    (am / "Video_Games.csv.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("amazon-2023:Video_Games", data_dir=str(am), verbose=False)
    write_amazon(am, extra_rows=[("U4", "A1", "x", 1)])
    with pytest.raises(DataError, match=r"Video_Games\.csv\.gz:16: rating 'x' is not a number"):
        load_dataset("amazon-2023:Video_Games", data_dir=str(am), verbose=False)
    for ts in (10**16, -1000):  # ms: year ~318,000 and 1969
        write_amazon(am, extra_rows=[("U4", "A1", 5.0, ts)])
        with pytest.raises(DataError, match=rf"Video_Games\.csv\.gz:16: timestamp '{ts}' is not a date "
                                            r"in \[1970, 2100\) \(expected unix milliseconds\)"):
            load_dataset("amazon-2023:Video_Games", data_dir=str(am), verbose=False)
    e = tmp_path / "empty"
    os.makedirs(e)
    with gzip.open(e / "Video_Games.csv.gz", "wt") as f:
        f.write("user_id,parent_asin,rating,timestamp\nU1,A1,5,1000\n")
    with gzip.open(e / "meta_Video_Games.jsonl.gz", "wt") as f:
        f.write('{"parent_asin": "A1", "title": "Game", "price": "$5"}\n')
    with pytest.raises(DataError, match="no interactions left after the filters"):
        load_dataset("amazon-2023:Video_Games", data_dir=str(e), verbose=False)
    with pytest.raises(DataError, match="missing Video_Games.csv"):
        load_dataset("amazon-2023:Video_Games", data_dir=str(tmp_path / "u"), verbose=False)
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", verbose=False)


def test_amazon_non_finite_metadata_numbers(tmp_path):
    am = tmp_path / "am"
    write_amazon(am, gz=False)
    meta = (am / "meta_Video_Games.jsonl").read_text().splitlines()
    meta[0] = json.dumps({"parent_asin": "A1", "title": "Super Game", "price": 1,
                          "average_rating": float("nan"), "rating_number": float("inf")})  # NaN, Infinity
    (am / "meta_Video_Games.jsonl").write_text("\n".join(meta) + "\n")
    ds = load_dataset("amazon-2023:Video_Games", data_dir=str(am), verbose=False)
    assert ds.items[1]["title"] == "Super Game"
    assert ds.items[1]["average_rating"] is None and ds.items[1]["rating_number"] is None


SYNTH_FORM = "expected synthetic or synthetic:<users>x<items>, users in [1, 1,000,000], items in [16, 1,000,000]"


def test_synthetic_size_is_part_of_the_name(cache_root):
    ds = load_dataset("synthetic:60x40", verbose=False)
    assert ds.name == "synthetic:60x40" and ds.num_users == 60 and 16 <= ds.num_items <= 40
    assert ds.domain == data.DOMAINS["synthetic"] and ds.domain["item"] == "movie"  # the movie words
    assert data.domain_for("synthetic:60x40") == data.domain_for("synthetic") == data.DOMAINS["synthetic"]
    assert os.listdir(cache_root) == ["synthetic-u60-i40-s0"]  # the slug of before sizes were names
    ds = load_dataset("synthetic:1x16", verbose=False)  # the smallest accepted
    assert ds.num_users == 1 and ds.num_items <= 16
    assert load_dataset("synthetic:25x20", seed=3, verbose=False).num_users == 25
    assert "synthetic-u25-i20-s3" in os.listdir(cache_root)


@pytest.mark.parametrize("name", ["synthetic:60", "synthetic:0x40", "synthetic:60x0", "synthetic:axb",
                                  "synthetic:60x40x2", "synthetic:", "synthetic:60X40", "synthetic:-1x40",
                                  "synthetic:060x40", "synthetic: 60x40", "synthetic:60x15", "synthetic:60x",
                                  "synthetic:1000001x40", "synthetic:60x99999999999999999999", "synthetic60x40"])
def test_bad_synthetic_names_are_one_line(cache_root, name):
    with pytest.raises(DataError) as e:
        load_dataset(name, verbose=False)
    msg = str(e.value)
    assert msg.startswith(f"dataset {name!r}: ") and SYNTH_FORM in msg and "\n" not in msg, msg
    assert not cache_root.exists()


def test_synthetic_sizes_are_checked_not_replaced(cache_root):
    # legacy keywords (callers from before sizes were names): a plain "synthetic" only, checked, None = default
    for kw, frag in (({"num_users": 0}, "synthetic: num_users 0 must be an integer in [1,"),
                     ({"num_items": 0}, "synthetic: num_items 0 must be an integer in [16,"),
                     ({"num_items": 15}, "num_items 15"), ({"seed": -1}, "synthetic: seed -1"),
                     ({"num_users": 2.5}, "num_users 2.5"), ({"seed": True}, "seed True")):
        with pytest.raises(DataError, match=re.escape(frag)):
            load_dataset("synthetic", verbose=False, **kw)
    with pytest.raises(DataError, match=re.escape("seed -1 must be an integer in [0,")):
        load_dataset("synthetic:60x40", seed=-1, verbose=False)
    for kw in ({"num_users": 60}, {"num_items": 40}, {"num_users": 60, "num_items": 40}):
        with pytest.raises(DataError, match=re.escape("'synthetic:60x40': expected synthetic or") + ".*"
                           + re.escape("and no num_users=/num_items=")):
            load_dataset("synthetic:60x40", verbose=False, **kw)
    with pytest.raises(DataError, match="--history 0: must be an integer >= 1"):
        load_dataset("synthetic", history=0, verbose=False)
    assert not cache_root.exists()
    ds = load_dataset("synthetic:1x16", verbose=False)  # the smallest accepted
    assert ds.num_users == 1 and ds.num_items <= 16
    assert load_dataset("synthetic", num_users=None, verbose=False).num_users == 600  # None = default
    assert load_dataset("synthetic:1x16", num_users=None, verbose=False).num_users == 1


def test_synthetic_name_keeps_cache_slug_and_key(cache_root, capsys):
    """synthetic:<U>x<I> reads the cache that plain synthetic + num_users/num_items wrote (slug AND key)."""
    a = load_dataset("synthetic:40x30")
    assert "built in" in capsys.readouterr().out
    (key,) = os.listdir(cache_root / "synthetic-u40-i30-s0")
    b = load_dataset("synthetic:40x30")
    assert "(cached" in capsys.readouterr().out and b.name == "synthetic:40x30"
    assert os.listdir(cache_root) == ["synthetic-u40-i30-s0"]
    assert os.listdir(cache_root / "synthetic-u40-i30-s0") == [key]
    for s in data.SPLITS:
        for f in data.FIELDS:
            np.testing.assert_array_equal(getattr(a.split(s), f), getattr(b.split(s), f))
    assert a.items == b.items and a.domain == b.domain
    load_dataset("synthetic:600x400", verbose=False)  # plain synthetic = synthetic:600x400: one cache
    load_dataset("synthetic")
    assert "(cached" in capsys.readouterr().out
    assert sorted(os.listdir(cache_root)) == ["synthetic-u40-i30-s0", "synthetic-u600-i400-s0"]
    assert len(os.listdir(cache_root / "synthetic-u600-i400-s0")) == 1


def test_load_for_run_reads_the_name_and_maps_old_configs(cache_root):
    ds = data.load_for_run({"dataset": "synthetic:40x30", "history": 6}, verbose=False)  # nothing else needed
    assert (ds.name, ds.num_users, ds.history) == ("synthetic:40x30", 40, 6)
    # a checkpoint's run_config.json from before sizes were names
    old = {"dataset": "synthetic", "synthetic_users": 40, "synthetic_items": 30, "history": 6, "data_dir": None}
    ds = data.load_for_run(old, verbose=False)
    assert (ds.name, ds.num_users, ds.history) == ("synthetic:40x30", 40, 6)
    assert os.listdir(cache_root) == ["synthetic-u40-i30-s0"]  # same slug, and one key: the same cache
    assert len(os.listdir(cache_root / "synthetic-u40-i30-s0")) == 1
    assert data.load_for_run({"dataset": "synthetic", "history": 6}, verbose=False).num_users == 600
    # a sized name wins over leftover keys; edited keys give the one-line name error
    new = {"dataset": "synthetic:40x30", "synthetic_users": 600, "synthetic_items": 400, "history": 6}
    assert data.load_for_run(new, verbose=False).num_users == 40
    with pytest.raises(DataError, match=re.escape("dataset 'synthetic:0x30': " + SYNTH_FORM)):
        data.load_for_run(dict(old, synthetic_users=0), verbose=False)


def test_formats_table():
    assert set(data.FORMATS) == {"synthetic", "synthetic-knowledge:", "ml-", "amazon-2023:", "csv:"}
    for prefix, (choices, files, parse) in data.FORMATS.items():
        assert isinstance(choices, str) and callable(files) and callable(parse)
    for name in ("csv:", "amazon-2023:", "synthetic-knowledge:", "nope", "SYNTHETIC", "ml"):
        with pytest.raises(DataError, match=re.escape(
                f"unknown dataset '{name}' (choose synthetic, synthetic-knowledge:<users>x<items>, ml-100k, ml-1m, "
                f"amazon-2023:<Category>, or csv:<dir>)")):
            load_dataset(name, verbose=False)


def test_history_too_large_for_memory(monkeypatch, cache_root):
    monkeypatch.setattr(data, "_physical_memory", lambda: 2**30)
    with pytest.raises(DataError, match=r"--history 100000: .* samples x 100000 would need .* smaller"):
        load_dataset("synthetic:20x16", history=100_000, verbose=False)
    assert not cache_root.exists()


def test_ml100k_without_source_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_recbole_dir", lambda name: None)  # so it is downloaded, here from nowhere:
    with socket.socket() as s:  # a loopback port nobody listens on (tests/test_download.py: the downloads)
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("R2EC_DOWNLOAD_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.setenv("no_proxy", "*")  # never through an http_proxy
    with pytest.raises(DataError) as e:
        load_dataset("ml-100k", verbose=False)
    assert "pip install --no-deps recbole==1.2.1" in str(e.value) and "--data-dir" in str(e.value)
    assert "cannot connect" in str(e.value) and "\n" not in str(e.value)
    url = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
    with pytest.raises(DataError, match=re.escape(f"not found: unzip {url} and pass --data-dir DIR")):
        load_dataset("ml-latest-small", verbose=False)  # no checksum known: never downloaded


def run_cli(*args, env_root):
    env = dict(os.environ, R2EC_DATA_ROOT=str(env_root))
    return subprocess.run([sys.executable, os.path.join(REPO, "data.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_errors_exit_2_one_line(tmp_path, cache_root):
    name = bad_csv(tmp_path, "user,item,timestamp\na,x,1\na,y,soon\n")
    cases = [(["--dataset", name], "interactions.csv:3: timestamp 'soon'"),
             (["--dataset", "nope"], "unknown dataset 'nope'"),
             (["--dataset", "synthetic", "--history", "0"], "--history: 0 must be >= 1"),
             (["--dataset", "synthetic:0x40"], "dataset 'synthetic:0x40': " + SYNTH_FORM),
             (["--dataset", "synthetic:60x3"], "dataset 'synthetic:60x3': " + SYNTH_FORM),
             (["--dataset", "synthetic", "--num-users", "50"], "unrecognized arguments: --num-users 50"),
             (["--dataset", "synthetic", "--seed", "-1"], "--seed: -1 must be >= 0"),
             (["--dataset", "ml-1m", "--data-dir", str(tmp_path / "missing")], "not a directory")]
    for args, frag in cases:
        r = run_cli(*args, env_root=cache_root)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert frag in r.stderr, r.stderr
    assert not cache_root.exists() and not (tmp_path / "missing").exists()  # no folder created
    r = run_cli("--dataset", "synthetic:50x40", "--seed", "2", env_root=cache_root)
    assert r.returncode == 0 and "users 50 | items 40" in r.stdout and "train" in r.stdout
    assert "dataset synthetic:50x40 |" in r.stdout and os.listdir(cache_root) == ["synthetic-u50-i40-s2"]


# ----------------------------------------------------------------------------- cache

def test_cache_round_trip_and_protocol_rebuild(tmp_path, cache_root, monkeypatch, capsys):
    a = load_dataset("synthetic:80x50")
    assert "built in" in capsys.readouterr().out
    t0 = time.time()
    b = load_dataset("synthetic:80x50")
    assert time.time() - t0 < 1.0 and "(cached" in capsys.readouterr().out
    for s in data.SPLITS:
        for f in data.FIELDS:
            x, y = getattr(a.split(s), f), getattr(b.split(s), f)
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    assert a.items == b.items and a.stats == b.stats and a.domain == b.domain and a.titles == b.titles
    # a half-written cache (temp dir) is never read; a changed protocol rebuilds
    base = cache_root / "synthetic-u80-i50-s0"
    (key,) = os.listdir(base)
    monkeypatch.setattr(data, "PROTOCOL_VERSION", data.PROTOCOL_VERSION + 1)
    load_dataset("synthetic:80x50")
    assert "built in" in capsys.readouterr().out
    c = load_dataset("synthetic:80x50", history=5)
    assert "built in" in capsys.readouterr().out and c.train.hist.shape[1] == 5
    assert len(os.listdir(base)) == 3
    load_dataset("synthetic:80x50", history=5, rebuild=True)
    assert "built in" in capsys.readouterr().out
    # source file change -> rebuild
    d = tmp_path / "c"
    rows = random_interactions(seed=9)
    name = make_csv_dir(d, rows)
    load_dataset(name, verbose=False)
    make_csv_dir(d, rows[:-3])
    ds = load_dataset(name)
    assert "built in" in capsys.readouterr().out and ds.stats["interactions"] == len(rows) - 3


def test_same_size_edit_with_restored_mtime_rebuilds(tmp_path, capsys):
    d = tmp_path / "c"
    rows = random_interactions(seed=4)
    name = make_csv_dir(d, rows, titles={"i3": "Title AAA"})
    k = lambda ds: [it.get("raw_id") for it in ds.items].index("i3")
    ds = load_dataset(name)
    assert ds.titles[k(ds)] == "Title AAA"
    items = d / "items.csv"
    st = os.stat(items)
    items.write_bytes(items.read_bytes().replace(b"Title AAA", b"Title BBB"))  # same size
    os.utime(items, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -t / tar leave it
    assert os.stat(items).st_size == st.st_size and os.stat(items).st_mtime_ns == st.st_mtime_ns
    capsys.readouterr()
    ds = load_dataset(name)
    assert "built in" in capsys.readouterr().out and ds.titles[k(ds)] == "Title BBB"
    os.utime(items, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch alone: same bytes, cached
    ds = load_dataset(name)
    assert ds.titles[k(ds)] == "Title BBB" and "(cached" in capsys.readouterr().out


CORRUPT = {  # file -> how a killed write or a bad disk leaves it
    "arrays.npz": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "meta.json": lambda p: p.write_text(p.read_text()[:-40]),
    "items.json": lambda p: p.write_text("[{}]"),  # valid JSON, wrong length
}


@pytest.mark.parametrize("what", list(CORRUPT) + ["meta key", "missing file"])
def test_unreadable_cache_rebuilds_with_notice(cache_root, capsys, what):
    a = load_dataset("synthetic:40x30", verbose=False)
    base = cache_root / "synthetic-u40-i30-s0"
    (key,) = os.listdir(base)
    if what in CORRUPT:
        CORRUPT[what](base / key / what)
    elif what == "meta key":
        meta = json.loads((base / key / "meta.json").read_text())
        del meta["stats"]
        (base / key / "meta.json").write_text(json.dumps(meta))
    else:
        os.remove(base / key / "meta.json")  # as if a file had been lost
    capsys.readouterr()
    b = load_dataset("synthetic:40x30", verbose=False)
    err = capsys.readouterr().err
    assert err.startswith(f"notice: cache {base / key} was unreadable (") and err.endswith("); rebuilding\n")
    assert err.count("\n") == 1 and "Traceback" not in err
    for s in data.SPLITS:
        for f in data.FIELDS:
            np.testing.assert_array_equal(getattr(a.split(s), f), getattr(b.split(s), f))
    assert a.items == b.items and os.listdir(base) == [key]
    load_dataset("synthetic:40x30", verbose=False)  # repaired: read quietly
    assert capsys.readouterr().err == ""


def test_leftovers_of_killed_builds_are_removed(cache_root):
    load_dataset("synthetic:40x30", verbose=False)
    base = cache_root / "synthetic-u40-i30-s0"
    (key,) = os.listdir(base)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free (reuse within the test is vanishingly unlikely)
    live = os.getppid()
    for n in (f"{key}.tmp{dead.pid}", f"{key}.old{dead.pid}", f"{'0' * 16}.tmp{dead.pid}",
              f"{key}.tmp{live}", "notes"):
        os.makedirs(base / n / "x")
    load_dataset("synthetic:40x30", verbose=False)
    assert sorted(os.listdir(base)) == sorted([key, f"{key}.tmp{live}", "notes"])  # live build kept


def test_unwritable_cache_root_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("R2EC_DATA_ROOT", str(tmp_path / "file"))
    with pytest.raises(DataError, match=r"cache folder .*file.*: cannot write \(.*\); point R2EC_DATA_ROOT"):
        load_dataset("synthetic:5x16", verbose=False)


# ----------------------------------------------------------------------------- real data

@pytest.mark.skipif(data._recbole_dir("ml-100k") is None, reason="recbole's ml-100k not installed")
def test_real_ml100k_counts():
    ds = load_dataset("ml-100k", verbose=False)
    assert (ds.num_users, ds.num_items) == (943, 1682)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (79245, 9906, 9906)
    assert ds.stats["interactions"] == 100_000 and ds.titles[1] == "Toy Story (1995)"
    assert ds.test.time.min() >= ds.train.time.max() and ds.stats["target_in_history"] == 0


def test_knowledge_world_is_seeded_sparse_and_its_corpus_is_the_items_only():
    """synthetic-knowledge: sizes in the name, a world per seed; the stats count (recomputed here) the valid/test
    targets that follow the relation and how many of those pairs no train sample shows; the corpus depends on
    the items only (another user count, same facts) and the control variant is the same world without it."""
    a = load_dataset("synthetic-knowledge:600x400", verbose=False)
    assert a.name == "synthetic-knowledge:600x400 seed=0" and a.domain["item"] == "movie"
    rel = a.relation
    assert (rel[1:] > 0).all() and (rel[1:] != np.arange(1, a.num_items + 1)).all()
    seen = set(zip(a.train.hist[:, -1].tolist(), a.train.target.tolist()))
    last = np.concatenate([a.valid.hist[:, -1], a.test.hist[:, -1]])
    target = np.concatenate([a.valid.target, a.test.target])
    hit = rel[last] == target
    unseen = np.mean([(x, y) not in seen for x, y in zip(last[hit].tolist(), target[hit].tolist())])
    k = a.stats["knowledge"]["valid+test"]
    assert k["follow_pct"] == pytest.approx(100 * hit.mean()) and k["unseen_pct"] == pytest.approx(100 * unseen)
    assert 0.25 < hit.mean() < 0.45 and unseen >= 0.7   # a third follow it; most of those pairs are new
    train_hit = rel[a.train.hist[:, -1]] == a.train.target
    assert train_hit.mean() > 0.25   # the habit is there to learn from train, the new pairs are not
    assert "never consecutive in train" in data.format_stats(a)
    b = load_dataset("synthetic-knowledge:600x400", verbose=False, seed=1)
    assert a.titles != b.titles and b.name.endswith("seed=1")
    c = load_dataset("synthetic-knowledge:300x400", verbose=False)   # other users: the same items, same facts
    facts = lambda ds: {(it["title"], ds.items[ds.relation[i]]["title"]) for i, it in enumerate(ds.items[1:], 1)}
    both = {f for f in facts(c) if {*f} <= set(a.titles)}
    assert len(both) >= 300 and both <= facts(a)
    d = data.load_for_run({"dataset": "synthetic-knowledge:300x400", "history": 20, "seed": 1}, verbose=False)
    assert d.name.endswith("seed=1") and len(facts(d) & facts(b)) >= 300 and len(facts(d) & facts(a)) < 30
    ctrl = load_dataset("synthetic-knowledge:600x400:no-corpus", verbose=False)
    for s in data.SPLITS:   # the same interactions, no relation in the items
        np.testing.assert_array_equal(ctrl.split(s).hist, a.split(s).hist)
        np.testing.assert_array_equal(ctrl.split(s).target, a.split(s).target)
    assert ctrl.titles == a.titles and not ctrl.relation.any() and "knowledge" not in ctrl.stats
    for bad in ("synthetic-knowledge:600", "synthetic-knowledge:0x40", "synthetic-knowledge:60x400:corpus",
                "synthetic-knowledge:60x10"):
        with pytest.raises(data.DataError, match="expected synthetic-knowledge:<users>x<items>"):
            load_dataset(bad, verbose=False)
