"""Smoke tests of bench.py at tiny sizes: the CPU case runner (fields, chunked == reference), one case
in a subprocess (the JSON contract the CPU table relies on), and the --gpu --dry orchestration."""
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"catalog": dict(M=7, N=1001, d=24, X=5), "logprob": dict(M=13, N=517, d=24)}
FIELDS = {"op", "impl", "mode", "ms", "gflops", "in_bytes", "needed_bytes", "peak_bytes", "fingerprint"}


@pytest.mark.parametrize("op,mode", [("catalog", "fwd"), ("catalog", "lossfwd"), ("catalog", "frozen"),
                                     ("catalog", "fwdbwd"), ("logprob", "fwd"), ("logprob", "frozen"),
                                     ("logprob", "fwdbwd")])
def test_cpu_case_fields_and_agreement(op, mode):
    ref = bench.cpu_case(op, "reference", mode, TINY[op], repeats=1)
    M, N, d = TINY[op]["M"], TINY[op]["N"], TINY[op]["d"]
    n_out = {"fwd": 3 if op == "catalog" else 1, "lossfwd": 1, "frozen": 2, "fwdbwd": 3}[mode]
    for impl in ("torch", "chunked"):
        got = bench.cpu_case(op, impl, mode, TINY[op], repeats=1)
        assert FIELDS <= set(got) and got["ms"] > 0 and len(got["times_ms"]) == 1
        assert got["in_bytes"] >= 4 * (M + N) * d                   # fp32 H/E (or hidden/W) at least
        if mode == "fwdbwd":                                        # grads are as big as the inputs
            assert got["needed_bytes"] >= got["in_bytes"] + 4 * (M + N) * d
        # the fingerprints (sums / norms of every output) must match the reference path
        assert len(got["fingerprint"]) == len(ref["fingerprint"]) == n_out
        for a, b in zip(got["fingerprint"], ref["fingerprint"]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
        assert any(abs(x) > 1e-3 for x in got["fingerprint"])      # not all zeros


def test_cpu_cases_and_dispatch_entries(tmp_path):
    cases = bench.cpu_cases()
    assert ("catalog", "frozen", "chunked") in cases and ("logprob", "fwdbwd", "reference") in cases
    assert not any(m == "lossfwd" for op, m, _ in cases if op == "logprob")
    path = str(tmp_path / "dispatch.json")
    bench.write_dispatch(path, {"a": dict(key="a", impl="torch"), "b": dict(key="b", impl="chunked")})
    bench.write_dispatch(path, {"a": dict(key="a", impl="chunked")})      # measured again: replaced, b kept
    assert {e["key"]: e["impl"] for e in json.load(open(path))["entries"]} == {"a": "chunked", "b": "chunked"}
    rows = [dict(op="logprob", label="s", dims=dict(M=4, N=50, d=8), impl=i, fwd_ms=f, fb_ms=b, frozen_ms="OOM")
            for i, f, b in (("naive", 1.0, 1.0), ("ours (chunked)", 2.0, 3.0), ("ours (triton)", 3.0, 2.0))]
    got = {k.split("|")[3]: e["impl"] for k, e in bench.gpu_dispatch(rows, "cuda:X", torch.bfloat16).items()}
    assert got == {"fwd": "chunked", "dX+dW": "triton"}                   # OOM / naive never chosen
    assert bench.fastest({"torch": 100.0, "chunked": 97.0}, "torch") == "torch"   # a noise-level win
    assert bench.fastest({"torch": 100.0, "chunked": 90.0}, "torch") == "chunked"


def test_case_subprocess_json():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--case", "logprob:torch:fwdbwd", "--json",
                        "--T", "9", "--V", "101", "--d", "8", "--repeats", "1"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert FIELDS <= set(r) and r["dims"] == dict(M=9, N=101, d=8) and r["peak_bytes"] > 0


def test_bad_case_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--case", "catalog:torch"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --case")


def test_bench_row_reports_oom_and_errors():
    A, B, t, _ = bench.make_inputs("logprob", 5, 40, 8)

    def oom(H, E, r):
        raise torch.OutOfMemoryError("fake")

    def broken(H, E, r):
        raise ValueError("bad shape")
    args = type("A", (), dict(warmup=0, reps=1, row_budget_s=60))()
    r = bench.bench_row("x", oom, A, B, None, None, torch.device("cpu"), args)
    assert r["fwd_ms"] == "OOM" and r["fb_ms"] == "OOM"
    r = bench.bench_row("y", broken, A, B, None, None, torch.device("cpu"), args)
    assert r["fb_ms"].startswith("error") and "bad shape" in r["note"]


def test_gpu_dry_orchestration(tmp_path):
    out, res = tmp_path / "out", tmp_path / "results"
    bench.main(["--gpu", "--dry", "--reps", "1", "--warmup", "0", "--out", str(out), "--results-dir", str(res)])
    assert not res.exists()                                         # --dry never writes bench/results
    md = next(out.glob("dry-cpu-*.md")).read_text()
    assert "| catalog | large | ours (torch) |" in md and "Checks at the large sizes" in md
    assert "| logprob | small | ours (chunked) | fwd + dX (table frozen) |" in md
    data = json.loads((out / "bench-gpu.json").read_text())
    for name in ("ours (torch)", "ours (chunked)"):
        assert len([r for r in data["rows"] if r["impl"] == name]) == 4
    for r in [r for r in data["rows"] if r["impl"].startswith("ours") or r["impl"] == "naive"]:
        assert all(isinstance(r[f"{m}_ms"], float) for m in ("fwd", "frozen", "fb")), r
        assert r["err_fwd"] < 1e-5 and r["err_frozen"] < 1e-5 and r["err_fb"] < 1e-5, r
    assert (out / "bench-log.txt").stat().st_size > 0


def test_e2e_tiny_phases_sum_to_step(tmp_path):
    """--e2e at a tiny size: every phase of train.py's step is seen, the phases account for the step time,
    and the results file ends with the table (phases come from model.Phases: nothing is patched)."""
    small = ("--synthetic-users 150 --synthetic-items 80 --history 8 --prompt-history 3 --tiny-layers 1 "
             "--tiny-hidden 32 --tiny-heads 2 --max-new-tokens 3 --num-generations 2 "
             "--batch-size 8 --micro-batch-size 4 --item-negatives 16 --train-recent 0")
    threads = torch.get_num_threads()
    # --threads 1: tiny ops on a shared CPU, where thread hand-offs cost more than the work
    out = bench.main(["--e2e", "--dataset", "synthetic", "--steps", "1", "--device", "cpu", "--quiet", "--threads",
                      "1", "--e2e-configs", "tiny,large", "--e2e-args=" + small, "--e2e-large-args=--tiny-layers 2",
                      "--results-dir", str(tmp_path)])
    assert torch.get_num_threads() == threads
    assert [r["name"] for r in out["results"]] == ["tiny", "large"]
    for res in out["results"]:
        (run,) = res["runs"]                                        # 1 timed step (the warm-up is dropped)
        named = {k: v for k, v in run.items() if k not in ("step", "other")}
        assert set(named) == {"rollout", "reward", "item encoding", "forward (tokens)", "losses", "backward",
                              "optimizer"}, named
        assert all(v > 0 for v in named.values())
        # phases are disjoint slices of the step: their sum is at most the step, and misses only glue code
        assert 0.7 * run["step"] <= sum(named.values()) <= run["step"] * 1.001 + 1e-3, run
        assert res["refresh_ms"] > 0 and res["tokens"] > res["gen_tokens"] > 0 and res["items"] >= 16
    assert out["results"][1]["n_params"] > out["results"][0]["n_params"]   # the larger config is larger
    md = open(out["path"]).read()
    assert os.path.basename(out["path"]).startswith("cpu-") and "-e2e-" in out["path"]
    assert md.rstrip().splitlines()[-1].startswith("| large | table refresh")
    assert "| tiny | **step** |" in md and "| large | backward |" in md


def test_e2e_bad_flags_are_one_line_errors(capsys):
    for argv, msg in ((["--e2e-configs", "huge"], "--e2e-configs"), (["--e2e-args=--no-such-flag"], "--e2e-args"),
                      (["--dataset", "no-such-dataset"], "")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--e2e", "--quiet", "--device", "cpu"] + argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error: " + msg), err
