"""train.py end to end on tiny synthetic data (CPU, tiny model): one-pass decoding against model.generate,
kernels vs PyTorch paths over a short RecPO run, learning, exact resume, and re-evaluation of a checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import eval as ev
import reference_model as refm
import train as T
import checkpoint
import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small synthetic world and a very small backbone: every run below takes seconds
SMALL = ["--dataset", "synthetic:150x80", "--history", "8",
         "--prompt-history", "3", "--tiny-layers", "1", "--tiny-hidden", "32", "--tiny-heads", "2",
         "--max-new-tokens", "2", "--num-generations", "2", "--batch-size", "8",
         "--micro-batch-size", "4", "--val-samples", "60", "--eval-batch-size", "64", "--time-budget", "0",
         "--device", "cpu", "--train-recent", "0", "--pretrain-steps", "0",
         "--kl-beta", "0", "--temperature", "2.0"]


def run(tmp_path, *extra, name="run"):
    cfg = T.resolve_config(SMALL + ["--out", str(tmp_path / name)] + list(extra))
    return T.train(cfg), cfg


@pytest.fixture(scope="module")
def small_model():
    cfg = T.resolve_config(SMALL)
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    r, _, _ = T.build(cfg, ds, verbose=False)
    r.model.eval()
    return r, ds


def test_decode_matches_generate_and_forward_both(small_model):
    """R2ec.decode = the plain generate loop + a full forward's h_T (tests/reference_model.py), including rows that write the anchor themselves,
    rows that end their turn early (EOS dropped) and rows cut off at the token limit."""
    r, ds = small_model
    prompts = r.split_prompt_ids(ds.valid, np.arange(3), 3)
    a, eos = r.anchor_ids, next(iter(r.stop_ids))
    x, y = 40, 41   # two ordinary tokens
    plans = [[x, y] + a, [x, eos], [y, x, y, x, y, x, y]]   # anchor at step 5 | EOS at step 2 | cut off
    orig = r.logits

    def scripted():
        calls = [0]

        def f(h):
            z = orig(h).clone()
            k = calls[0]
            calls[0] += 1
            for i in range(h.shape[0]):
                z[i, plans[i][min(k, len(plans[i]) - 1)]] += 1e4
            return z
        return f
    try:
        r.logits = scripted()
        ro1 = refm.generate(r, prompts, greedy=True, max_new_tokens=6)
        r.logits = scripted()
        ro2, h = r.decode(prompts, greedy=True, max_new_tokens=6)
    finally:
        del r.logits   # back to the class's method
    assert torch.equal(ro1["input_ids"], ro2["input_ids"])
    assert ro2["cut"].tolist() == [False, True, True]
    assert torch.equal(ro1["sampled_mask"], ro2["sampled_mask"])
    with torch.no_grad():
        _, h_ref, _ = refm.forward_full(r, ro2["input_ids"], ro2["attention_mask"], ro2["completion_mask"])
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-4)
    # sampling with G > 1: one prompt encoding repeated G times gives the same h_T / log-probs as a full pass
    ro, h = r.decode(prompts, G=3, greedy=False, temperature=2.0, top_k=50, max_new_tokens=4, seed=1)
    with torch.no_grad():
        lp, h_ref, _ = refm.forward_full(r, ro["input_ids"], ro["attention_mask"], ro["completion_mask"], 2.0)
        lp_c, h_sh, _ = r.forward_both(ro, G=3, temperature=2.0)   # the shared-prefix pass agrees too
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h_sh, h_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lp_c, lp[:, ro["prompt_len"]:], atol=1e-4, rtol=1e-4)
    m = ro["sampled_mask"]
    torch.testing.assert_close(lp[m], ro["old_logp"][m], atol=1e-4, rtol=1e-4)
    assert len(set(map(tuple, ro["input_ids"][:3].tolist()))) > 1   # the G chains differ


def test_kernels_and_torch_paths_agree(tmp_path):
    """A short RecPO run with the Triton kernels (interpreter on CPU) and with the PyTorch paths.
    Rewards and entropies agree step by step. Losses agree on average: their per-step values go through
    z-scored advantages, which amplify fp32-level reward differences inside near-tied groups (an exact
    kernel-vs-torch equality of advantages is not a property fp32 arithmetic has)."""
    common = ["--max-steps", "8", "--eval-every", "0", "--test-samples", "none", "--item-loss", "full",
              "--num-iterations", "2"]
    res_k, _ = run(tmp_path, *common, "--kernels", "triton", name="k")
    res_t, _ = run(tmp_path, *common, "--kernels", "torch", name="t")
    assert len(res_k["log"]) == len(res_t["log"]) == 8
    for a, b in zip(res_k["log"], res_t["log"]):
        for key in ("reward", "r_d", "entropy"):   # the weights drift apart at fp32 level over 8 steps x 2 updates
            assert a[key] == pytest.approx(b[key], rel=5e-3, abs=1e-4), (a["step"], key)
    for key, tol in (("item_nll", 0.05), ("token_loss", 0.02)):
        mk = np.mean([x[key] for x in res_k["log"]])
        mt = np.mean([x[key] for x in res_t["log"]])
        assert abs(mk - mt) < tol, (key, mk, mt)
    assert np.mean([x["item_nll"] for x in res_t["log"]]) > 0.05   # the item term is not trivially zero
    assert all("clip_ratio/low_mean" in x for x in res_t["log"])           # two passes: clipping can happen


def test_learning_raises_valid_ndcg(tmp_path):
    """A short RecPO run on synthetic data (planted successor structure) lifts valid NDCG@10 well above the
    untrained model's (sampled item loss: here the 80 negatives are the whole catalog, all fresh)."""
    res, _ = run(tmp_path, "--max-steps", "160", "--eval-every", "40", "--lr", "3e-3", "--item-loss", "sampled",
                 "--item-negatives", "80", "--batch-size", "32", "--micro-batch-size", "32",
                 "--val-samples", "all", "--kernels", "torch", "--test-samples", "none", "--patience", "0")
    ndcg = [e["val/ndcg@10"] for e in res["evals"]]   # all 423 valid samples: a smooth curve
    assert res["evals"][0]["step"] == 0 and len(ndcg) == 5
    assert max(ndcg[1:]) > 1.4 * ndcg[0] and max(ndcg[1:]) - ndcg[0] > 0.02, ndcg


def test_resume_continues_exactly_and_checkpoint_reevaluates(tmp_path):
    """Stop at step 4 (checkpoint), resume: step 5 has the same loss as in the uninterrupted run. The best
    checkpoint re-evaluates on test to exactly what training printed."""
    kw = ("--eval-every", "4", "--patience", "0", "--kernels", "torch", "--num-iterations", "2")
    full, cfg = run(tmp_path, "--max-steps", "5", *kw, name="full")
    last4 = tmp_path / "cut"
    run(tmp_path, "--max-steps", "4", *kw, "--test-samples", "none", name="cut")
    res = T.train(T.resolve_config(["--resume", str(last4 / "last"), "--max-steps", "5", "--test-samples", "none"]))
    a, b = full["log"][4], res["log"][0]
    assert b["step"] == a["step"] == 5
    for key in ("reward", "token_loss", "item_nll", "grad_norm"):
        assert b[key] == a[key], key
    # the best checkpoint, scored again, gives the numbers training printed
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    rb, saved = checkpoint.load_checkpoint(str(tmp_path / "full" / "best"), "cpu", dataset=ds)
    m, _ = ev.evaluate_model(rb, ds, "test", saved, verbose=False)
    assert m == full["test"]
    with open(tmp_path / "full" / "results.json") as f:
        assert json.load(f)["test"] == full["test"]
    # and so does the CLI: eval.py --ckpt prints the row training printed
    p = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "full" / "best"), "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    row = [ln for ln in p.stdout.splitlines() if ln.startswith("| R2ec")][0]
    trained = [ln for ln in full["table"].splitlines() if ln.startswith("| R2ec")][0]
    assert row.split("|")[2:] == trained.split("|")[2:]
    assert "[eval] synthetic:150x80 | split=test" in p.stdout and "latency:" in p.stdout
    # --samples: a fixed seeded subset, said in the header, scored like evaluate_model on those samples
    m_sub, _, rows = ev.evaluate_checkpoint(str(tmp_path / "full" / "best"), ds, "test", "cpu", samples=40, seed=3,
                                            verbose=False)
    idx = ev.subset_idx(len(ds.test), 40, 3)
    assert len(idx) == 40 and m_sub == ev.evaluate_model(rb, ds, "test", saved, idx, verbose=False)[0]
    assert "popularity (same subset)" in rows and "SASRec" not in rows


def test_cli_errors_are_one_line(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr


def test_embedding_lr_group():
    """--embed-lr-mult puts the tied embedding / LM head in its own AdamW group at lr x mult."""
    cfg = T.resolve_config(SMALL + ["--embed-lr-mult", "0.25"])
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    r, params, _ = T.build(cfg, ds, verbose=False)
    groups = T.param_groups(r, params, cfg["embed_lr_mult"])
    emb = [g for g in groups if any(p is r.lm_weight for p in g["params"])]
    assert len(emb) == 1 and len(emb[0]["params"]) == 1 and emb[0]["lr_mult"] == 0.25
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_nan_weights_are_never_best(tmp_path, monkeypatch):
    """Weights forced to NaN after step 3: the following updates are skipped (non-finite gradient), their
    evaluations score 0 (a NaN user state ranks last), best/ stays the finite step-2 model, and after
    MAX_BAD_STEPS skipped steps in a row the run stops with a one-line error."""
    orig, calls = T.update, [0]

    def poisoned(r, cfg, batch, opt, params, lr, ph=None):
        calls[0] += 1
        if calls[0] == 4:
            with torch.no_grad():
                for p in params:
                    p.fill_(float("nan"))
        return orig(r, cfg, batch, opt, params, lr, ph)
    monkeypatch.setattr(T, "update", poisoned)
    with pytest.raises(T.TrainError, match="non-finite"):
        run(tmp_path, "--max-steps", "30", "--eval-every", "2", "--patience", "0", "--kernels", "torch", "--test-samples", "none")
    recs = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    evals = [x for x in recs if "val/ndcg@10" in x]
    assert evals[0]["step"] == 0 and max(e["step"] for e in evals) >= 6
    assert all(e["val/ndcg@10"] == 0 and e["val/hr@20"] == 0 for e in evals if e["step"] >= 4), evals
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    rb, _ = checkpoint.load_checkpoint(str(tmp_path / "run" / "best"), "cpu", dataset=ds)
    assert all(torch.isfinite(p).all() for p in rb.model.parameters()) and torch.isfinite(rb.table.E).all()
    state = checkpoint.load_train_state(str(tmp_path / "run" / "best"))
    assert state["state"]["best_step"] <= 2


def test_trl_metric_names_report_to_and_plot(tmp_path, capsys):
    """Step records carry TRL's metric names; --report-to refuses a missing optional package in one line
    before anything is created; eval.py --plot draws the run's curves (or says matplotlib is missing)."""
    res, cfg = run(tmp_path, "--max-steps", "2", "--eval-every", "2", "--test-samples", "none", "--kernels", "torch")
    rec = res["log"][-1]
    for k in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "entropy", "grad_norm",
              "learning_rate", "item_nll"):
        assert k in rec, k
    assert "kl" not in rec   # --kl-beta 0: no reference model, no KL: nothing logged that never moves
    assert 0 < rec["completions/mean_length"] <= 2 and rec["learning_rate"] > 0
    for kind in ("tensorboard", "wandb"):
        try:
            common.reporter(kind)
        except common.UserError as e:   # not installed here: the run is refused before it creates anything
            assert str(e).startswith(f"--report-to {kind}: pip install")
            with pytest.raises(SystemExit) as ex:
                T.main(SMALL + ["--report-to", kind, "--out", str(tmp_path / kind)])
            assert ex.value.code == 2 and not (tmp_path / kind).exists()
    capsys.readouterr()
    try:
        import matplotlib  # noqa: F401
        has_mpl = True
    except ImportError:
        has_mpl = False
    code = 0
    try:
        ev.main(["--plot", cfg["out"]])
    except SystemExit as e:
        code = e.code
    if has_mpl:
        assert code == 0 and os.path.getsize(os.path.join(cfg["out"], "curves.png")) > 10_000
    else:
        assert code == 2 and "matplotlib" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        ev.main(["--plot", str(tmp_path / "nothing-here")])
    assert ex.value.code == 2


def test_one_pass_ratio_is_one(tmp_path, monkeypatch):
    """--num-iterations 1: pi_old is the update's own log-probs, so no token or item action is ever clipped
    (the sampler's numbers never enter the ratio), and the log leaves the clip fractions out (0 by
    construction); the loss's log-probs are at the sampling temperature."""
    seen = []
    update = T.update
    monkeypatch.setattr(T, "update", lambda *a, **k: seen.append(update(*a, **k)) or seen[-1])
    a, cfg = run(tmp_path, "--max-steps", "3", "--eval-every", "0", "--test-samples", "none", "--temperature", "1.5",
                 "--lr", "0.05", name="a")
    assert cfg["logp_temperature"] == 1.5 and len(seen) == 3
    for st in seen:
        assert st["clip_low"] == st["clip_high"] == st["item_clip_low"] == st["item_clip_high"] == 0
    assert not any(k.startswith(("clip_ratio/", "item_clip")) for rec in a["log"] for k in rec)


def test_no_step_metric_is_constant_over_a_run(tmp_path):
    """The cpu preset's step log on a 50-step synthetic run (a smaller batch): every number moves."""
    cfg = T.resolve_config(["--dataset", "synthetic:150x80", "--max-steps", "50", "--eval-every", "0",
                            "--test-samples", "none", "--batch-size", "8", "--micro-batch-size", "8",
                            "--device", "cpu", "--kernels", "torch", "--out", str(tmp_path / "m")])
    assert cfg["preset"] == "cpu" and cfg["pretrain_steps"] == 50   # the LM stage bounded like the run
    log = T.train(cfg)["log"]
    assert len(log) == 50
    for k in log[0]:
        values = [json.dumps(rec.get(k), sort_keys=True) for rec in log]
        assert len(set(values)) > 1, (k, values[0])


def test_fit_threads_gives_way_to_a_busy_core(monkeypatch):
    """common.fit_threads: another process busy on one of 2 cores -> 1 torch thread; idle again -> 2 again; never
    above the threads torch started with; a no-op for CUDA devices. /proc/stat, the clock and os.times are faked."""
    import io
    clock, busy, ours = [1000.0], [0], [0.0]
    monkeypatch.setattr(common, "open", lambda path, *a, **k: io.StringIO(
        f"cpu  {busy[0]} 0 0 99999 0 0 0 0 0 0\ncpu0 0 0 0 0\ncpu1 0 0 0 0\n"), raising=False)
    monkeypatch.setattr(common.time, "time", lambda: clock[0])
    monkeypatch.setattr(common.os, "times", lambda: type("T", (), {"user": ours[0], "system": 0.0})())
    monkeypatch.setattr(common.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(common, "_THREADS", {"on": True, "cpus": 2, "max": 2, "last": None})
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        common.fit_threads("cpu")                                   # first call: the window starts
        clock[0], busy[0], ours[0] = 1002.0, 400, 2.0          # 2 s: 4 core-seconds busy, 2 of them ours
        assert common.fit_threads("cpu") == 1
        clock[0], busy[0], ours[0] = 1002.5, 900, 2.5          # inside the window: no new decision
        assert common.fit_threads("cpu") == 1
        clock[0], busy[0], ours[0] = 1004.0, 600, 4.0          # the other process is gone
        assert common.fit_threads("cpu") == 2
        common._THREADS["max"] = 1                                   # OMP_NUM_THREADS=1 at start: never more
        clock[0], busy[0], ours[0] = 1006.0, 800, 6.0
        assert common.fit_threads("cpu") == 1
        torch.set_num_threads(2)
        assert common.fit_threads("cuda:0") == 2                     # CUDA runs: untouched
    finally:
        torch.set_num_threads(n0)


def test_unseen_architecture_trains_and_answers(small_model, tmp_path, capsys):
    """A Hugging Face architecture the project has no code for (GPT-2: Conv1D projections, learned positions, no
    chat template) goes through --init-from, a LoRA RecPO step and eval.py --history unchanged."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = small_model[0].tok
    torch.manual_seed(0)
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=1024,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    res, cfg = run(tmp_path, "--init-from", str(d), "--lora-r", "2", "--max-steps", "1", "--eval-every", "0",
                   "--test-samples", "none")
    step = res["log"][-1]
    assert step["step"] == 1 and np.isfinite(step["grad_norm"]) and step["grad_norm"] > 0
    capsys.readouterr()
    ev.main(["--ckpt", os.path.join(cfg["out"], "last"), "--history", "1 | 2 | 3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "reasoning" in out.lower() and out.count("\n") >= 10, out


def test_cut_penalty_is_a_format_reward(small_model, monkeypatch):
    """--cut-penalty p: the same rollout (same seeds) with p > 0 lowers the reward of exactly the chains cut at
    the cap by p, so the advantages change; without reasoning (no chains) it changes nothing."""
    r, ds = small_model
    decode = r.decode

    def some_cut(*a, **k):   # the random backbone never writes the anchor: mark every third row as cut
        ro, h_T = decode(*a, **k)
        return {**ro, "cut": torch.arange(len(ro["cut"])) % 3 == 0}, h_T
    monkeypatch.setattr(r, "decode", some_cut)
    out = {}
    for nr in (False, True):
        for p in (0.0, 0.3):
            cfg = T.resolve_config(SMALL + ["--cut-penalty", str(p), "--max-new-tokens", "3"]
                                   + ["--no-reasoning"] * nr)
            out[nr, p] = T.rollout(r, ds, cfg, step=2)
    a, b = out[False, 0.0], out[False, 0.3]
    cut = a.ro["cut"].float()
    assert 0 < cut.mean() < 1, cut                                 # some chains wrote the anchor, some were cut
    torch.testing.assert_close(b.rw["reward"], a.rw["reward"] - 0.3 * cut)
    assert not torch.equal(a.adv, b.adv)
    torch.testing.assert_close(out[True, 0.3].rw["reward"], out[True, 0.0].rw["reward"])


def test_full_fine_tuning_keeps_fp32_master_weights(tmp_path, monkeypatch):
    """--lora-r 0 on a Hugging Face backbone loads it in fp32 (bf16 compute comes from autocast on CUDA), so
    AdamW's small steps are not rounded away; with LoRA the base may load in bf16 (dtype left to the device)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (hf / f).write_text("{}")
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    seen = []

    def fake_build(*a, dtype=None, **k):
        seen.append(dtype)
        raise common.UserError("stop here")
    monkeypatch.setattr(T.backbone, "build_backbone", fake_build)
    for r, want in (("0", torch.float32), ("4", None)):
        cfg = T.resolve_config(SMALL + ["--init-from", str(hf), "--lora-r", r, "--out", str(tmp_path / r)])
        with pytest.raises(common.UserError, match="stop here"):
            T.build(cfg, ds, verbose=False)
        assert seen[-1] is want, (r, seen)


@pytest.mark.parametrize("mode", ["inbatch", "sampled"])
def test_item_loss_does_not_depend_on_the_micro_batch_size(tmp_path, mode):
    """The item softmax's candidates are all of the step's targets, whatever the micro-batches: the same rollout
    updated with --micro-batch-size 2 and 8 (batch 8) gives the same item and token losses (to float tolerance;
    two processes: tests/test_distributed.py). The gradients differ by design: another micro-batch's targets
    enter detached, as another process's do in the reference code."""
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    out = {}
    for mb in ("2", "8"):
        cfg = T.resolve_config(SMALL + ["--micro-batch-size", mb, "--item-loss", mode, "--item-negatives", "5",
                                        "--kernels", "torch", "--out", str(tmp_path / mb)])
        torch.manual_seed(0)
        r, params, _ = T.build(cfg, ds, verbose=False)
        batch = T.rollout(r, ds, cfg, step=3)
        assert len(batch.chunks) == 8 // int(mb)
        opt = torch.optim.AdamW(params, lr=0.0)
        out[mb] = T.update(r, cfg, batch, opt, params, 0.0)
    for k in ("item_logp", "item_loss", "token_loss"):
        assert out["2"][k] == pytest.approx(out["8"][k], rel=1e-4, abs=1e-6), (k, out["2"][k], out["8"][k])
