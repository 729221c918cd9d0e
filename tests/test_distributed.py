"""torchrun on CPU (gloo, 2 processes): the first step's loss and gradient norm equal the 1-process run's,
eval.py's metrics are exactly the 1-process ones, a stopped 2-process run resumes to the uninterrupted
run's next step, and only one copy of each checkpoint and log line is written. Plus, in-process: a chain's
sampling noise does not depend on how the step's users are split between processes.

Each 2-process run is a real subprocess (`python -m torch.distributed.run --standalone`) on the tiny SMALL
setup of test_train.py; the 1-process runs it is compared with run in this process. Every process gets one
thread (OMP_NUM_THREADS=1, torchrun's default; torch.set_num_threads(1) here), so both sides of each
comparison run the same kernels."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import eval as ev
import model as M
import train as T
from test_train import ROOT, SMALL

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# an evaluation every 2 steps: the stopped run's last checkpoint (step 2) holds the table the uninterrupted run has
FLAGS = SMALL + ["--eval-every", "2", "--patience", "0", "--test-samples", "none", "--kernels", "torch"]
# `eval.py ARGS` as its CLI runs, + the metrics at full precision in the file argv[1] (the table prints 4 digits),
# + a check that every process holds every user's h_T exactly once (unit norm; ranks alone would not see a 2 x H),
# + a check that run_cli's destroy_process_group stopped gloo's threads: one left running into interpreter exit
# (the group held by a default argument of torch.distributed.nn.functional, which transformers imports) can
# release the last collective's tensor after finalization began, take the GIL and abort the process (SIGABRT)
EVAL = """import json, os, sys
import torch
import data, eval as ev, model as M
import common
encode, score = M.R2ec.encode_users, ev.evaluate_checkpoint
def once(self, *a, **kw):
    H, tm = encode(self, *a, **kw)
    assert torch.allclose(H.norm(dim=1), torch.ones(len(H)), atol=1e-5)
    return H, tm
M.R2ec.encode_users = once
def keep(*a, **kw):
    m, tm, rows = score(*a, **kw)
    if common.is_main():
        json.dump(m, open(sys.argv[1], "w"))
    return m, tm, rows
ev.evaluate_checkpoint = keep
ev.main(sys.argv[2:])
tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []   # Linux: names threads
left = [n for n in (open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks) if "gloo" in n]
assert not left, f"gloo threads alive after run_cli: {left}"
"""


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def launch(n, *args, check=True):
    """`python -m torch.distributed.run --standalone --nproc_per_node n SCRIPT ARGS`."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    p = subprocess.run(run + list(args), cwd=ROOT, env={**ENV, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                       timeout=600)
    assert not check or p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def steps(out):
    return {r["step"]: r for r in records(out) if "reward" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 processes x 3 steps; 2 processes stopped at step 2, then resumed to step 3."""
    d = tmp_path_factory.mktemp("dist")
    out = {k: str(d / k) for k in ("two", "cut")}
    p = {"two": launch(2, "train.py", *FLAGS, "--max-steps", "3", "--out", out["two"]),
         "cut": launch(2, "train.py", *FLAGS, "--max-steps", "2", "--out", out["cut"])}
    p["resumed"] = launch(2, "train.py", "--resume", os.path.join(out["cut"], "last"), "--max-steps", "3")
    return d, out, p


def test_first_step_equals_one_process(runs, tmp_path, one_thread):
    """2 processes x B/2 users = 1 process x B users: the same users, the same chains (noise per user), the
    same micro-batches; gradients summed with weights from the global row count. Measured here: equal to the
    last bit at step 1 (~1e-7 apart later: a process pads its prompts to its own users' longest, and the
    attention's reductions round differently); the tolerance allows for kernels that round per batch shape."""
    _, out, _ = runs
    a, b = T.train(T.resolve_config(FLAGS + ["--max-steps", "1", "--out", str(tmp_path / "one")]))["log"][0], \
        steps(out["two"])[1]
    for k in ("token_loss", "item_nll", "grad_norm", "reward", "reward_std", "r_d", "adv_std", "entropy",
              "completions/mean_length", "completions/clipped_ratio", "rank_median"):
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (k, a[k], b[k])


def test_resume_under_torchrun_continues_exactly(runs):
    _, out, p = runs
    a, b = steps(out["two"])[3], steps(out["cut"])[3]   # the resumed run appends to the stopped run's log
    for k in ("reward", "token_loss", "item_nll", "grad_norm", "entropy"):
        assert b[k] == a[k], k
    assert "stopped at step 3: max steps" in p["resumed"].stdout


def test_one_copy_of_each_checkpoint_and_log_line(runs):
    _, out, p = runs
    recs = records(out["two"])
    assert sum("config" in r for r in recs) == 1
    assert [r["step"] for r in recs if "reward" in r] == [1, 2, 3]
    files = sorted(os.listdir(out["two"]))
    assert [f for f in files if not f.startswith(".")] == ["best", "last", "log.jsonl", "results.json"]
    hidden = [f for f in files if f.startswith(".")]
    assert len(hidden) == 2 and {os.path.realpath(os.path.join(out["two"], f)) for f in ("best", "last")} == \
        {os.path.join(os.path.realpath(out["two"]), f) for f in hidden}
    for line in ("step 1 |", "stopped at step 3", "done in", "preset cpu | config:"):
        assert p["two"].stdout.count(line) == 1, line


def test_eval_metrics_exactly_one_process(runs, one_thread):
    """`torchrun --nproc_per_node 2 eval.py --ckpt ...`: each process decodes every other batch of the same
    length-sorted batches, H is summed (the other process's rows are 0), every process ranks all of it: the
    metrics equal one process's to the last bit, rank 0 alone prints them, and no gloo thread outlives run_cli."""
    d, out, _ = runs
    script = d / "score.py"
    script.write_text(EVAL)
    ckpt = os.path.join(out["two"], "last")
    cli = launch(2, str(script), str(d / "m2.json"), "--ckpt", ckpt, "--device", "cpu", "--batch-size", "16")
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    m1, _, _ = ev.evaluate_checkpoint(ckpt, ds, "test", "cpu", 16, verbose=False, baselines=False)
    assert json.loads((d / "m2.json").read_text()) == m1 and m1["ndcg@20"] > 0
    rows = [ln for ln in cli.stdout.splitlines() if ln.startswith("| R2ec")]
    assert len(rows) == 1 and cli.stdout.count("[eval] synthetic:150x80 | split=test") == 1
    assert rows[0].split("|")[2:-1] == [f" {m1[k]:.4f} " for k in ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10",
                                                                   "ndcg@20")]


def test_batch_not_divisible_by_processes_is_refused(tmp_path):
    p = launch(2, "train.py", *FLAGS, "--batch-size", "7", "--out", str(tmp_path / "x"), check=False)
    assert p.returncode != 0 and not os.path.exists(tmp_path / "x")
    assert "error: --batch-size 7 must be a multiple of --micro-batch-size 3 x 2 processes" in p.stderr


def test_chains_do_not_depend_on_the_split():
    """decode's noise is per (seed, user position, chain): the step's 4 users decoded at once or as 2 + 2 (two
    processes, first = 0 and 2) sample the same chains."""
    cfg = T.resolve_config(SMALL + ["--max-new-tokens", "6"])
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    r, _, _ = T.build(cfg, ds, verbose=False)
    prompts = r.split_prompt_ids(ds.train, np.arange(4), 3)
    kw = dict(G=3, greedy=False, temperature=2.0, top_k=50, max_new_tokens=6, seed=(0, 7))
    whole, _ = r.decode(prompts, **kw)
    halves = [r.decode(prompts[k:k + 2], first=k, **kw)[0] for k in (0, 2)]
    texts = r.decode_completions(whole)
    assert texts == r.decode_completions(halves[0]) + r.decode_completions(halves[1])
    assert len(set(texts)) > 3   # the chains do differ from one another


def test_sample_next_draws_from_the_tempered_top_k_softmax():
    """Inverse-CDF sampling at the caller's uniforms: frequencies match softmax(z / T) over the top k."""
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).repeat(40000, 1)
    u = torch.from_numpy(np.random.default_rng(0).random(40000))
    tok, lp = M.sample_next(z, temperature=2.0, top_k=3, u=u)
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.5]) / 2.0, 0)
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    assert freq[3] == freq[4] == 0
    torch.testing.assert_close(freq[:3], p, atol=0.01, rtol=0)
    torch.testing.assert_close(lp, torch.log_softmax(z / 2.0, -1).gather(1, tok[:, None]).squeeze(1))


def test_gradients_are_reduced_in_buckets(monkeypatch):
    """all_reduce_grads: one collective per ~bucket (not per tensor), every gradient summed exactly once, a
    parameter with no gradient on any process left without one, one with a gradient elsewhere given zeros."""
    import common
    calls = []

    def fake_all_reduce(t, op=None):   # 2 processes holding the same tensors: the sum doubles them
        calls.append(t.numel())
        t.mul_(2)
    monkeypatch.setattr(common, "world", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (7, 300, 5, 1000, 33, 2)]
    for p in params[:4] + params[5:]:
        p.grad = torch.randn(p.shape, generator=g)
    params[4].grad = None                   # no gradient here; elsewhere ("has" is reduced by max: stays 0)
    want = [None if p.grad is None else p.grad.clone() * 2 for p in params]
    common.all_reduce_grads(params, bucket_bytes=1200 * 4)
    assert params[4].grad is None
    for p, w in zip(params, want):
        assert w is None or torch.equal(p.grad, w)
    assert calls[1:] == [7 + 300 + 5, 1000 + 2]   # calls[0]: which parameters have a gradient anywhere
