"""Smoke tests of bench/ at tiny sizes: bench/kernels.py's CPU case runner (fields, chunked == reference), one case
in a subprocess (the JSON contract the CPU table relies on), the --gpu --dry orchestration; bench/step.py's phases
(it runs train.py's step); one-line CLI errors; .ci/gpu's exit status."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench.kernels as bk  # noqa: E402

TINY = {"catalog": dict(M=7, N=1001, d=24, X=5), "logprob": dict(M=13, N=517, d=24)}
FIELDS = {"op", "impl", "mode", "ms", "gflops", "in_bytes", "needed_bytes", "peak_bytes", "fingerprint"}


def script(name, *argv, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", name), *argv], capture_output=True, text=True,
                          env=env)


@pytest.mark.parametrize("op,mode", [("catalog", "fwd"), ("catalog", "lossfwd"), ("catalog", "frozen"),
                                     ("catalog", "fwdbwd"), ("logprob", "fwd"), ("logprob", "frozen"),
                                     ("logprob", "fwdbwd")])
def test_cpu_case_fields_and_agreement(op, mode):
    ref = bk.cpu_case(op, "reference", mode, TINY[op], repeats=1)
    M, N, d = TINY[op]["M"], TINY[op]["N"], TINY[op]["d"]
    n_out = {"fwd": 3 if op == "catalog" else 1, "lossfwd": 1, "frozen": 2, "fwdbwd": 3}[mode]
    for impl in ("torch", "chunked"):
        got = bk.cpu_case(op, impl, mode, TINY[op], repeats=1)
        assert FIELDS <= set(got) and got["ms"] > 0 and len(got["times_ms"]) == 1
        assert got["in_bytes"] >= 4 * (M + N) * d                   # fp32 H/E (or hidden/W) at least
        if mode == "fwdbwd":                                        # grads are as big as the inputs
            assert got["needed_bytes"] >= got["in_bytes"] + 4 * (M + N) * d
        # the fingerprints (sums / norms of every output) must match the reference path
        assert len(got["fingerprint"]) == len(ref["fingerprint"]) == n_out
        for a, b in zip(got["fingerprint"], ref["fingerprint"]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
        assert any(abs(x) > 1e-3 for x in got["fingerprint"])      # not all zeros


def test_cpu_table_prints_ratios_not_verdicts():
    cases = [c for c in bk.cpu_cases() if c[0] == "logprob"]
    base = dict(ms=10.0, gflops=1.0, fingerprint=[1.0], needed_bytes=100, threads=1)
    res = {(op, impl, mode): dict(base, peak_bytes={"reference": 1000, "torch": 110, "chunked": 200}[impl])
           for op, mode, impl in cases}
    text = "\n".join(bk.cpu_table(res, cases, {"logprob": dict(M=4, N=50, d=8)}))
    assert "PASS" not in text and "FAIL" not in text
    assert "| logprob | M=4 N=50 d=8 | fwd | torch | 10 | 1.00 | 1.0 | 0.000 | 0.000 | 1.10 | 0.110 | 0.011 | yes |" in text
    assert "needed / reference peak" in text and "logprob fwd 0.100" in text


def test_cpu_cases_and_dispatch_entries(tmp_path):
    cases = bk.cpu_cases()
    assert ("catalog", "frozen", "chunked") in cases and ("logprob", "fwdbwd", "reference") in cases
    assert not any(m == "lossfwd" for op, m, _ in cases if op == "logprob")
    path = str(tmp_path / "dispatch.json")
    bk.write_dispatch(path, {"a": dict(key="a", impl="torch"), "b": dict(key="b", impl="chunked")})
    bk.write_dispatch(path, {"a": dict(key="a", impl="chunked")})      # measured again: replaced, b kept
    assert {e["key"]: e["impl"] for e in json.load(open(path))["entries"]} == {"a": "chunked", "b": "chunked"}
    rows = [dict(op="logprob", label="s", dims=dict(M=4, N=50, d=8), impl=i, fwd_ms=f, fb_ms=b, frozen_ms="OOM")
            for i, f, b in (("naive", 1.0, 1.0), ("ours (chunked)", 2.0, 3.0), ("ours (triton)", 3.0, 2.0))]
    got = {k.split("|")[3]: e["impl"] for k, e in bk.gpu_dispatch(rows, "cuda:X", torch.bfloat16).items()}
    assert got == {"fwd": "chunked", "dX+dW": "triton"}                   # OOM / naive never chosen
    assert bk.fastest({"torch": 100.0, "chunked": 97.0}, "torch") == "torch"   # a noise-level win
    assert bk.fastest({"torch": 100.0, "chunked": 90.0}, "torch") == "chunked"


def test_case_subprocess_json():
    p = script("kernels.py", "--case", "logprob:torch:fwdbwd", "--json", "--T", "9", "--V", "101", "--d", "8",
               "--repeats", "1")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert FIELDS <= set(r) and r["dims"] == dict(M=9, N=101, d=8) and r["peak_bytes"] > 0


@pytest.mark.parametrize("name,argv,flag", [("kernels.py", ["--case", "catalog:bogus:fwd"], "--case"),
                                            ("kernels.py", ["--M", "-5"], "--M"),
                                            ("step.py", ["--steps", "0"], "--steps")])
def test_bad_arguments_are_one_line_errors(name, argv, flag):
    p = script(name, *argv)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith(f"error: bench/{name}: argument {flag}"), p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


@pytest.mark.parametrize("argv,msg", [(["--case", "catalog:torch"], "argument --case"), (["--dry"], "--dry only"),
                                      (["--json"], "--json only"), (["--N", "1"], "argument --N"),
                                      (["--row-budget-s", "0"], "argument --row-budget-s")])
def test_kernels_flag_errors_in_process(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        bk.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: bench/kernels.py: {msg}"), err


def test_bench_row_reports_oom_and_errors():
    A, B, t, _ = bk.make_inputs("logprob", 5, 40, 8)

    def oom(H, E, r):
        raise torch.OutOfMemoryError("fake")

    def broken(H, E, r):
        raise ValueError("bad shape")
    args = type("A", (), dict(warmup=0, reps=1, row_budget_s=60))()
    r = bk.bench_row("x", oom, A, B, None, None, torch.device("cpu"), args)
    assert r["fwd_ms"] == "OOM" and r["fb_ms"] == "OOM"
    r = bk.bench_row("y", broken, A, B, None, None, torch.device("cpu"), args)
    assert r["fb_ms"].startswith("error") and "bad shape" in r["note"]


def test_gpu_comparisons_print_ratios():
    rows = [dict(op="catalog", label="large", impl=i, fb_ms=ms, fb_peak=pk)
            for i, ms, pk in (("naive", 160.0, 1000), ("ours (triton)", 125.0, 91), ("cce", 250.0, 90))]
    assert bk.comparisons(rows, "catalog") == [
        "- catalog: ours (triton) 125.00 ms = 1.28x faster than naive (160.00 ms); peak memory 0.091x naive's",
        "- catalog: ours (triton) takes 0.50x the time of the fastest peer, cce (250.00 ms)"]
    rows[0]["fb_ms"] = "OOM"
    assert bk.comparisons(rows, "catalog")[0] == "- catalog: naive ran out of memory here; ours (triton) took 125.00 ms"


def test_gpu_dry_orchestration(tmp_path):
    out, res = tmp_path / "out", tmp_path / "results"
    bk.main(["--gpu", "--dry", "--reps", "1", "--warmup", "0", "--out", str(out), "--results-dir", str(res)])
    assert not res.exists()                                         # --dry never writes bench/results
    md = next(out.glob("dry-cpu-*.md")).read_text()
    assert "| catalog | large | ours (torch) |" in md and "Comparisons at the large sizes" in md
    assert "| logprob | small | ours (chunked) | fwd + dX (table frozen) |" in md
    assert "faster than naive" in md and "PASS" not in md and "FAIL" not in md
    data = json.loads((out / "bench-gpu.json").read_text())
    for name in ("ours (torch)", "ours (chunked)"):
        assert len([r for r in data["rows"] if r["impl"] == name]) == 4
    for r in [r for r in data["rows"] if r["impl"].startswith("ours") or r["impl"] == "naive"]:
        assert all(isinstance(r[f"{m}_ms"], float) for m in ("fwd", "frozen", "fb")), r
        assert r["err_fwd"] < 1e-5 and r["err_frozen"] < 1e-5 and r["err_fb"] < 1e-5, r
    assert (out / "bench-log.txt").stat().st_size > 0


def test_step_tiny_phases_sum_to_step(tmp_path):
    """bench/step.py at a tiny size (needs train.py's API): every phase of train.py's step is seen, the phases
    account for the step time, and the results file ends with the table (phases come from common.Phases)."""
    import bench.step as bs
    small = ("--history 8 --prompt-history 3 --tiny-layers 1 --tiny-hidden 32 --tiny-heads 2 --max-new-tokens 3 "
             "--num-generations 2 --batch-size 8 --micro-batch-size 4 --item-negatives 16 --train-recent 0")
    threads = torch.get_num_threads()
    # --threads 1: tiny ops on a shared CPU, where thread hand-offs cost more than the work
    out = bs.main(["--dataset", "synthetic:150x80", "--steps", "1", "--device", "cpu", "--threads", "1",
                   "--configs", "tiny,large", "--train-args=" + small, "--large-args=--tiny-layers 2",
                   "--results-dir", str(tmp_path)])
    assert torch.get_num_threads() == threads
    assert [r["name"] for r in out["results"]] == ["tiny", "large"]
    for res in out["results"]:
        (run,) = res["runs"]                                        # 1 timed step (the warm-up is dropped)
        named = {k: v for k, v in run.items() if k not in ("step", "other")}
        assert set(named) == {p for p, _ in bs.PHASES}, named
        assert all(v > 0 for v in named.values())
        # phases are disjoint slices of the step: their sum is at most the step, and misses only glue code
        assert 0.7 * run["step"] <= sum(named.values()) <= run["step"] * 1.001 + 1e-3, run
        assert res["refresh_ms"] > 0 and res["tokens"] > res["gen_tokens"] > 0 and res["items"] >= 16
    assert out["results"][1]["n_params"] > out["results"][0]["n_params"]   # the larger config is larger
    md = open(out["path"]).read()
    assert os.path.basename(out["path"]).startswith("cpu-") and "-e2e-" in out["path"]
    assert md.rstrip().splitlines()[-1].startswith("| large | table refresh")
    assert "| tiny | **step** |" in md and "| large | backward |" in md and "python bench/step.py" in md


def test_step_bad_flags_are_one_line_errors(capsys):
    """Refused before any model is built: bench/step.py's own flags, train.py's (needs train.resolve_config) and
    the dataset (data.load_for_run)."""
    import bench.step as bs
    for argv, msg in ((["--configs", "huge"], "error: bench/step.py: argument --configs"),
                      (["--train-args=--no-such-flag"], "error: --train-args / --large-args: train.py refuses"),
                      (["--dataset", "no-such-dataset"], "error: ")):
        with pytest.raises(SystemExit) as e:
            bs.main(["--device", "cpu", "--configs", "tiny"] + argv)
        err = [x for x in capsys.readouterr().err.strip().splitlines() if x]
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith(msg), err


@pytest.mark.parametrize("py,rc", [("true", 0), ("false", 1)])
def test_ci_gpu_exit_status(py, rc, tmp_path):
    """.ci/gpu exits 0 exactly when every part did: with PYTHON=true every part passes, with false every part
    fails (the parts themselves are not run)."""
    env = dict(os.environ, PYTHON=py, TMPDIR=str(tmp_path))
    p = subprocess.run(["bash", os.path.join(ROOT, ".ci", "gpu"), "--dry"], capture_output=True, text=True, env=env)
    assert p.returncode == rc, p.stdout + p.stderr
    res = next(tmp_path.glob("*/dry-gpu-check.md")).read_text()
    assert res.count("\nexit 0 " if rc == 0 else "\nexit 1 ") == 5
