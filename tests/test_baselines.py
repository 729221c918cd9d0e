"""baselines.py: popularity against an independent implementation of the data protocol and the evaluation protocol (eval.py) written here with
plain loops; SASRec trained briefly on `synthetic` beats popularity; the CLI prints the protocol
and the table, writes the json, and refuses bad input with exit code 2."""
import contextlib
import io
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import baselines
import data
import eval as ev

DEVICE = os.environ.get("R2EC_TEST_DEVICE", "cpu")


class ToySplit:
    def __init__(self, hist, target):
        self.hist, self.target = np.asarray(hist, np.int64), np.asarray(target, np.int64)
        self.user = np.arange(len(self.target), dtype=np.int64)

    def __len__(self):
        return len(self.target)


def independent_popularity(ds, split_name):
    """The evaluation protocol from scratch: counts of train targets; for each sample, the number of unmasked items
    (not padding, not in the history, not the target) whose count is >= the target's."""
    N = ds.num_items
    counts = [0] * (N + 1)
    for t in ds.train.target:
        counts[int(t)] += 1
    sp = getattr(ds, split_name)
    hits = {k: 0 for k in ev.KS}
    gains = {k: 0.0 for k in ev.KS}
    for s in range(len(sp)):
        t = int(sp.target[s])
        masked = {0} | {int(x) for x in sp.hist[s]}
        if t in masked:
            continue                                   # target in its own history: a miss
        r = 0
        for j in range(1, N + 1):
            if j != t and j not in masked and counts[j] >= counts[t]:
                r += 1
        for k in ev.KS:
            if r < k:
                hits[k] += 1
                gains[k] += 1.0 / math.log2(r + 2)
    n = len(sp)
    out = {}
    for k in ev.KS:
        out[f"hr@{k}"] = hits[k] / n
        out[f"ndcg@{k}"] = gains[k] / n
    return out


def test_popularity_matches_independent_on_fixture():
    # a catalog of 30 items where many train counts tie; some targets sit in their own history
    rng = np.random.default_rng(0)
    N = 30
    train = ToySplit(np.zeros((200, 4)), rng.choice([1, 2, 3, 4, 5, 6, 7, 8], size=200, p=[.3, .2, .1, .1, .1, .1, .05, .05]))
    hist = rng.integers(0, N + 1, size=(80, 4))
    target = rng.integers(1, 10, size=80)
    hist[:5, -1] = target[:5]
    test = ToySplit(hist, target)
    ds = SimpleNamespace(name="toy", num_items=N, train=train, valid=test, test=test,
                         train_counts=lambda: np.bincount(train.target, minlength=N + 1))   # as data.Dataset
    got = ev.evaluate_popularity(ds, "test", batch_size=7, verbose=False)
    want = independent_popularity(ds, "test")
    assert want["hr@5"] > 0 and want["ndcg@20"] < 1
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_epoch_windows_tile_each_users_sequence():
    # users' samples interleaved in time; each epoch, per user, every H-th sample from a random phase
    user = np.array([0, 1, 0, 0, 2, 1, 0, 0, 1, 0, 0, 0, 2, 0])
    H = 3
    for seed in range(5):
        w = baselines.epoch_windows(user, H, np.random.default_rng(seed))
        for u in np.unique(user):
            mine = np.flatnonzero(user == u)                       # time order
            picked = np.flatnonzero(np.isin(mine, w))             # positions within the user
            assert len(picked) >= 1 and (np.diff(picked) == H).all()
            assert len(mine) - 1 - picked.max() < min(H, len(mine))   # phase from the user's last
        assert len(set(w.tolist())) == len(w)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One short CLI run on `synthetic` (3 epochs), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("baselines")
    old_root = os.environ.get("R2EC_DATA_ROOT")
    os.environ["R2EC_DATA_ROOT"] = str(tmp / "data")
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            baselines.main(["--dataset", "synthetic", "--epochs", "3", "--patience", "3",
                            "--device", DEVICE, "--out-dir", str(tmp / "out"),
                            # the Triton interpreter is too slow for per-epoch validation on CPU;
                            # test_eval/test_catalog check that every path ranks identically
                            "--impl", "auto" if DEVICE == "cuda" else "torch"])
        ds = data.load_dataset("synthetic", verbose=False)
    finally:
        torch.set_num_threads(threads)
        if old_root is None:
            os.environ.pop("R2EC_DATA_ROOT")
        else:
            os.environ["R2EC_DATA_ROOT"] = old_root
    with open(tmp / "out" / "synthetic.json") as f:
        js = json.load(f)
    return buf.getvalue(), js, ds


def test_cli_prints_protocol_and_table(cli_run):
    out, js, ds = cli_run
    assert out.count("pessimistic") >= 2 and "split=valid" in out and "split=test" in out
    assert f"N={ds.num_items:,}" in out
    for row in ("popularity (valid)", "SASRec (valid)", "popularity (test)", "SASRec (test)"):
        assert f"| {row} |" in out
    assert js["dataset"] == "synthetic" and js["sasrec"]["epochs_run"] == 3


def test_cli_popularity_matches_independent_on_synthetic(cli_run):
    _, js, ds = cli_run
    for split in ("valid", "test"):
        want = independent_popularity(ds, split)
        for k in want:
            assert js[split]["popularity"][k] == pytest.approx(want[k], abs=1e-12), (split, k)


def test_sasrec_beats_popularity_on_synthetic(cli_run):
    _, js, _ = cli_run
    for split in ("valid", "test"):
        sas, pop = js[split]["sasrec"], js[split]["popularity"]
        assert sas["hr@10"] > pop["hr@10"] + 0.05 and sas["ndcg@10"] > pop["ndcg@10"] + 0.05, (split, sas, pop)
    # early stopping restored the best epoch: its valid NDCG@10 is what the table reports
    assert js["valid"]["sasrec"]["ndcg@10"] == pytest.approx(js["sasrec"]["best_valid_ndcg@10"], abs=1e-12)


@pytest.mark.parametrize("argv,msg", [
    (["--dataset", "no-such-dataset"], "unknown dataset"),
    (["--dataset", "synthetic", "--dim", "64", "--heads", "3"], "--heads"),
    (["--dataset", "synthetic", "--epochs", "0"], "--epochs"),
])
def test_cli_bad_input_exits_2(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("R2EC_DATA_ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        baselines.main(argv + ["--out-dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]
