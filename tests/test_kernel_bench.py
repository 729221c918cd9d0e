"""bench/kernels.py --gpu as .ci/gpu runs it: rows written as they are measured (a run cut short keeps every
finished row, its JSON and the dispatch entries of every finished size), the time budget ends the run, the
kernels issue's targets per case (met, or by how much missed), and the entropy-on calls training makes, with
dispatch entries of their own. On CPU at tiny sizes (the --dry sizes)."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench.kernels as bk  # noqa: E402


def _args(tmp_path, *extra):
    return bk.get_parser().parse_args(["--gpu", "--reps", "1", "--warmup", "0", "--out",
                                       str(tmp_path / "out"), "--results-dir", str(tmp_path / "res"), *extra])


def _cut_after(monkeypatch, n):
    """bench_row raises KeyboardInterrupt (a kill) when called the (n+1)-th time."""
    calls, row = [], bk.bench_row

    def cut(*a, **k):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(a[0])
        return row(*a, **k)
    monkeypatch.setattr(bk, "bench_row", cut)
    return calls


def test_a_cut_run_keeps_every_finished_row(tmp_path, monkeypatch):
    calls = _cut_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        bk.gpu_main(_args(tmp_path, "--dry"))
    md = next((tmp_path / "out").glob("dry-cpu-*.md")).read_text()
    assert md.startswith("# Kernel benchmark: CPU (--dry") and "| op | size | impl | mode |" in md
    for name in calls:                                      # naive, ours x2, dry-peer; then logprob's naive
        assert md.count(f"| {name} | forward only |") >= 1, name
    assert md.count("| catalog | small | ") == 4 * 3 + 2                 # liger, cce: one line each
    assert "| logprob | small | naive | fwd + dX + dW |" in md
    data = json.loads((tmp_path / "out" / "bench-gpu.json").read_text())
    assert {r["op"] for r in data["rows"]} == {"catalog"} and len(data["rows"]) == 6   # the finished size
    assert not (tmp_path / "res").exists()                  # --dry writes neither results/ nor dispatch


def test_the_real_mode_writes_dispatch_entries_after_each_size(tmp_path, monkeypatch):
    """The real orchestration (not --dry) on CPU tensors: results/ and the dispatch file are written as the
    sizes finish; the log-prob size adds entries for its entropy-on calls."""
    monkeypatch.setattr(bk, "DRY_SIZES", bk.DRY_SIZES[:2])
    dispatch = tmp_path / "dispatch.json"
    args = _args(tmp_path, "--no-tests", "--no-ref", "--dispatch-file", str(dispatch))
    _cut_after(monkeypatch, 4 + 5)                          # catalog: 4 rows; logprob: naive, ours x4, cut
    with pytest.raises(KeyboardInterrupt):
        bk._gpu_main(args, torch.device("cpu"), torch.float32, "fp32", ("chunked", "torch"), bk.DRY_SIZES)
    keys = [e["key"].split("|")[2:4] for e in json.loads(dispatch.read_text())["entries"]]
    assert sorted(keys) == [["catalog", "dX"], ["catalog", "dX+dW"], ["catalog", "fwd"]]
    md = next((tmp_path / "res").glob("*.md")).read_text()
    assert md == next((tmp_path / "out").glob("*.md")).read_text()
    assert "| logprob | small | ours (torch) +entropy | fwd + dX (table frozen) |" in md
    rows = [dict(op="logprob", label="s", dims=dict(M=4, N=50, d=8), impl=i, fwd_ms=1.0, fb_ms=b, frozen_ms=b)
            for i, b in (("ours (chunked) +entropy", 2.0), ("ours (triton) +entropy", 1.0),
                         ("ours (triton)", 3.0))]
    got = {k: e["impl"] for k, e in bk.gpu_dispatch(rows, "cuda:X", torch.bfloat16).items()}
    assert got["cuda:X|bfloat16|logprob+entropy|dX|1e3"] == "triton" and len(got) == 6
    assert got["cuda:X|bfloat16|logprob|dX|1e3"] == "triton"


def test_the_time_budget_ends_the_run(tmp_path):
    out = bk.gpu_main(_args(tmp_path, "--dry", "--budget-s", "0"))
    md = next((tmp_path / "out").glob("dry-cpu-*.md")).read_text()
    assert md.count("skipped: past --budget-s 0") == len(bk.DRY_SIZES) == len(out["rows"])
    assert "Comparisons at the large sizes" in md
    assert md.rstrip().splitlines()[-1].startswith("total wall time")


def test_rows_give_the_targets_and_how_far_a_case_misses():
    peak = dict(matmul_tflops=0.2, copy_gbs=1.0)            # one GEMM pass at M = N = d = 1000: 10 ms
    dims = dict(M=1000, N=1000, d=1000)
    naive = dict(op="logprob", label="large", dims=dims, impl="naive", fwd_ms=30.0, fwd_peak=1000,
                 frozen_ms=60.0, frozen_peak=1000, fb_ms=100.0, fb_peak=1000)
    ours = dict(naive, impl="ours (triton)", fwd_ms=12.0, fwd_peak=200, frozen_ms=20.0, frozen_peak=50,
                fb_ms=40.0, fb_peak=50)
    fwd, frozen, fb = bk.row_lines(ours, naive, peak)
    assert "| 1.20x met | 2.50x met | 0.00 | 0.200, misses by 0.100 |" in fwd
    assert "| 1.00x met | 3.00x met |" in frozen and "| 0.050 met |" in frozen
    assert "| 1.33x, misses by 0.08x | 2.50x met |" in fb
    assert "met" not in "".join(bk.row_lines(naive, naive, peak))   # naive: no verdicts
    text = "\n".join(bk.TABLE_HEAD + [fwd, frozen, fb])
    assert "PASS" not in text and "FAIL" not in text and all(ln.count("|") == 16 for ln in text.splitlines())


def test_cpu_entropy_modes_measure_the_training_call():
    cases = bk.cpu_cases()
    assert ("logprob", "frozen+ent", "chunked") in cases and ("logprob", "fwdbwd+ent", "reference") in cases
    assert not [c for c in cases if c[0] == "catalog" and c[1].endswith("+ent")]
    assert bk.dispatch_grads("logprob", "frozen+ent") == "dX" and bk.split_mode("fwd+ent") == ("fwd", True)
    dims = dict(M=13, N=517, d=24)
    ref = bk.cpu_case("logprob", "reference", "fwdbwd+ent", dims)
    for impl, mode in (("torch", "frozen+ent"), ("chunked", "fwdbwd+ent"), ("chunked", "fwd+ent")):
        got = bk.cpu_case("logprob", impl, mode, dims)
        assert len(got["fingerprint"]) == {"frozen+ent": 3, "fwdbwd+ent": 4, "fwd+ent": 2}[mode]
        assert got["fingerprint"][-1] == pytest.approx(ref["fingerprint"][-1], rel=1e-5)   # the entropy
        assert got["fingerprint"][0] == pytest.approx(ref["fingerprint"][0] if mode != "fwd+ent" else
                                                      -ref["fingerprint"][0] * dims["M"], rel=1e-5)
