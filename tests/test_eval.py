"""eval.py: metrics on hand-computed ranks, exact agreement with a brute-force argsort ranking on
random scores with many ties, the pessimistic tie rule, masking, and batch-size invariance."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import eval as ev


class ToySplit:
    def __init__(self, hist, target):
        self.hist = np.asarray(hist, dtype=np.int64)
        self.target = np.asarray(target, dtype=np.int64)
        self.user = np.arange(len(self.target), dtype=np.int64)

    def __len__(self):
        return len(self.target)


def toy_dataset(N, S, Hw, seed, p_target_in_hist=0.1):
    """S samples over items 1..N, histories of random length, left-padded with 0."""
    rng = np.random.default_rng(seed)
    hist = np.zeros((S, Hw), dtype=np.int64)
    target = rng.integers(1, N + 1, size=S)
    for s in range(S):
        L = rng.integers(1, Hw + 1)
        hist[s, Hw - L:] = rng.integers(1, N + 1, size=L)        # duplicates allowed
        if rng.random() < p_target_in_hist:
            hist[s, -1] = target[s]                              # target inside its own history
    sp = ToySplit(hist, target)
    return SimpleNamespace(name="toy", num_items=N, train=sp, valid=sp, test=sp)


def brute_force_ranks(scores, hist, target):
    """Independent ranking: argsort the unmasked items by score, place the target after every tie."""
    S, N1 = scores.shape
    out = np.empty(S, dtype=np.int64)
    for s in range(S):
        masked = {0} | set(int(x) for x in hist[s])
        t = int(target[s])
        if t in masked:
            out[s] = N1
            continue
        cand = [j for j in range(N1) if j not in masked]
        order = sorted(cand, key=lambda j: (-scores[s, j], 0 if j != t else 1))   # ties: target last
        out[s] = order.index(t)
    return out


def brute_force_metrics(ranks, ks=ev.KS):
    m = {}
    for k in ks:
        m[f"hr@{k}"] = sum(1.0 for r in ranks if r < k) / len(ranks)
        m[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
    return m


def int_embeddings(N, S, d, seed):
    """Small integer entries: dot products are exact in fp32 and collide often (many ties)."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randint(-2, 3, (S, d), generator=g).float()
    E = torch.randint(-2, 3, (N + 1, d), generator=g).float()
    return H, E


def test_metrics_on_hand_computed_ranks():
    ranks = np.array([0, 1, 4, 5, 9, 10, 19, 20, 1000])
    m = ev.metrics_from_ranks(ranks)
    assert m["hr@5"] == pytest.approx(3 / 9)
    assert m["hr@10"] == pytest.approx(5 / 9)
    assert m["hr@20"] == pytest.approx(7 / 9)
    n5 = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(6)
    n10 = n5 + 1 / math.log2(7) + 1 / math.log2(11)
    n20 = n10 + 1 / math.log2(12) + 1 / math.log2(21)
    assert m["ndcg@5"] == pytest.approx(n5 / 9)
    assert m["ndcg@10"] == pytest.approx(n10 / 9)
    assert m["ndcg@20"] == pytest.approx(n20 / 9)
    assert ev.metrics_from_ranks(torch.tensor([0, 0]))["ndcg@5"] == 1.0
    with pytest.raises(ev.EvalError):
        ev.metrics_from_ranks(np.array([]))


@pytest.mark.parametrize("impl", ["auto", "torch", "reference"])
@pytest.mark.parametrize("N,S,d", [(37, 29, 3), (101, 50, 5)])
def test_agrees_with_brute_force_argsort_with_ties(N, S, d, impl, device):
    ds = toy_dataset(N, S, Hw=6, seed=N)
    H, E = int_embeddings(N, S, d, seed=N)
    H[::2] = E[torch.from_numpy(ds.test.target[::2])]        # half the users point at their target
    scores = (H @ E.T).numpy()
    assert (np.diff(np.sort(scores, axis=1), axis=1) == 0).mean() > 0.5     # ties really happen
    ref = brute_force_ranks(scores, ds.test.hist, ds.test.target)
    assert (ref == N + 1).any() and (ref < 5).any() and (ref > 20).any()

    Hd, Ed = H.to(device), E.to(device)
    m1, r1 = ev.evaluate(ds, "test", lambda idx: Hd[torch.as_tensor(idx, device=device)], Ed,
                         batch_size=16, verbose=False, return_ranks=True, impl=impl)
    np.testing.assert_array_equal(r1, ref)
    want = brute_force_metrics(ref)
    for k in want:
        assert m1[k] == pytest.approx(want[k], abs=1e-12)

    m2, r2 = ev.evaluate_scores(ds, "test", lambda idx, a, b: torch.from_numpy(scores[idx, a:b]),
                                batch_size=16, item_chunk=7, verbose=False, return_ranks=True)
    np.testing.assert_array_equal(r2, ref)
    assert m2 == m1


def test_tau_does_not_change_ranks(device):
    ds = toy_dataset(40, 20, Hw=5, seed=3)
    H, E = int_embeddings(40, 20, 4, seed=3)
    H, E = H.to(device), E.to(device)
    f = lambda idx: H[torch.as_tensor(idx, device=device)]  # noqa: E731
    _, r1 = ev.evaluate(ds, "test", f, E, verbose=False, return_ranks=True)
    _, r2 = ev.evaluate(ds, "test", f, E, tau=0.25, verbose=False, return_ranks=True)
    np.testing.assert_array_equal(r1, r2)


def test_constant_scorer_scores_zero(device):
    N = 60                                           # > 20 + history, so every rank is >= 20
    ds = toy_dataset(N, 40, Hw=10, seed=1)
    H = torch.zeros(40, 4, device=device)
    E = torch.randn(N + 1, 4, device=device)
    m = ev.evaluate(ds, "test", lambda idx: H[torch.as_tensor(idx, device=device)], E, verbose=False)
    assert all(v == 0.0 for v in m.values())
    m2 = ev.evaluate_scores(ds, "test", lambda idx, a, b: torch.full((len(idx), b - a), 3.0),
                            item_chunk=13, verbose=False)
    assert all(v == 0.0 for v in m2.values())
    # an optimistic rule would have given a perfect score: check the scorer is really constant
    _, r = ev.evaluate_scores(ds, "test", lambda idx, a, b: torch.ones(len(idx), b - a),
                              verbose=False, return_ranks=True)
    assert r.min() >= N - 10 - 1


def test_masked_history_and_padding_never_count(device):
    N, S, Hw = 30, 25, 6
    ds = toy_dataset(N, S, Hw, seed=7, p_target_in_hist=0.0)
    hist, target = ds.test.hist, ds.test.target
    # scores: padding and history items score highest, the target next, everything else below
    scores = np.zeros((S, N + 1))
    for s in range(S):
        scores[s, :] = np.arange(N + 1) * 1e-3
        scores[s, 0] = 1e9
        scores[s, hist[s][hist[s] > 0]] = 1e6
        scores[s, target[s]] = 1e3
    _, r = ev.evaluate_scores(ds, "test", lambda idx, a, b: torch.from_numpy(scores[idx, a:b]),
                              item_chunk=8, verbose=False, return_ranks=True)
    np.testing.assert_array_equal(r, 0)
    # same through the H . E path: one-hot H picks score column s from a per-sample E table
    E = torch.zeros(N + 1, S, dtype=torch.float32)
    E[:, :] = torch.from_numpy(scores.T).float()
    H = torch.eye(S)
    _, r2 = ev.evaluate(ds, "test", lambda idx: H[torch.as_tensor(idx)].to(device), E.to(device),
                        batch_size=4, verbose=False, return_ranks=True)
    np.testing.assert_array_equal(r2, 0)
    # a target inside its own history is a miss even if it scores highest
    ds.test.hist[0, -1] = target[0]
    _, r3 = ev.evaluate_scores(ds, "test", lambda idx, a, b: torch.from_numpy(scores[idx, a:b]),
                               verbose=False, return_ranks=True)
    assert r3[0] == N + 1 and (r3[1:] == 0).all()


def test_batch_size_invariance(device):
    N, S = 211, 45                   # batch 1 = 45 kernel launches (slow under the interpreter)
    ds = toy_dataset(N, S, Hw=8, seed=11)
    H, E = int_embeddings(N, S, 6, seed=11)
    H, E = H.to(device), E.to(device)
    scores = (H @ E.T).cpu()
    res, res_s = [], []
    for bs in (1, 7, 64):
        res.append(ev.evaluate(ds, "test", lambda idx: H[torch.as_tensor(idx, device=device)], E,
                               batch_size=bs, verbose=False, return_ranks=True))
        res_s.append(ev.evaluate_scores(ds, "test", lambda idx, a, b: scores[idx, a:b],
                                        batch_size=bs, item_chunk=50, verbose=False, return_ranks=True))
    for m, r in res[1:] + res_s:
        np.testing.assert_array_equal(r, res[0][1])
        assert m == res[0][0]
    assert 0 < res[0][0]["hr@20"] < 1


def test_header_table_and_errors(capsys):
    ds = toy_dataset(25, 12, Hw=4, seed=2)
    head = ev.protocol_header(ds, "valid")
    for s in ("valid", "12 samples", "N=25", "history", "padding", "pessimistic", "5, 10, 20", "log2(r+2)"):
        assert s in head
    E = torch.randn(26, 3)
    ev.evaluate(ds, "valid", lambda idx: torch.randn(len(idx), 3), E, verbose=True)
    assert "pessimistic" in capsys.readouterr().out
    t = ev.format_table({"pop": ev.metrics_from_ranks([0, 7]), "x": ev.metrics_from_ranks([30])})
    lines = t.splitlines()
    assert lines[0].startswith("| model | HR@5 | HR@10 | HR@20 | NDCG@5")
    assert "| pop | 0.5000 | 1.0000 | 1.0000 | 0.5000 |" in t and len(lines) == 4
    with pytest.raises(ev.EvalError, match="item_table"):
        ev.evaluate(ds, "test", lambda idx: torch.zeros(len(idx), 3), torch.zeros(25, 3), verbose=False)
    with pytest.raises(ev.EvalError, match="split"):
        ev.evaluate(ds, "dev", lambda idx: torch.zeros(len(idx), 3), E, verbose=False)


def test_final_cost_counts_the_test_subset_and_not_the_table_refresh(capsys):
    """The test-pass reserve: the last valid pass's reasoning + ranking per sample (its table refresh is not
    repeated: the test re-scores the saved table) x the test samples (--test-samples when set), capped at the
    budget's non-training share, with one warning when the cap binds."""
    e = {"eval_n": 200, "eval_s": 138.0, "eval_decode_s": 80.0, "eval_rank_s": 1.0}
    cfg = {"test_samples": 1000, "time_budget": 30.0}
    state = {"evals": [e]}
    assert ev.final_cost(state, 9906, cfg, 0.6) == pytest.approx(1.15 * 81 / 200 * 1000 + 15)
    assert "slow_warned" not in state
    assert ev.final_cost(state, 9906, {**cfg, "test_samples": 0}, 0.6) == pytest.approx(0.4 * 30 * 60)
    assert state["slow_warned"] and "slower than expected" in capsys.readouterr().out
    assert ev.final_cost({"evals": [e]}, 9906, {**cfg, "test_samples": -1}, 0.6) == 0
