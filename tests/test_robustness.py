"""Every CLI refuses bad input the same way: exit code 2, exactly one stderr line `error: ...` naming the
flag or file and what to do, no traceback, and nothing left behind (no output folder, no cache folder,
no half-written file: the watched folders are byte-for-byte unchanged).

Covers train.py, eval.py, data.py, baselines.py and model.py: bad flags, bad data files, damaged
checkpoint folders (copies of one real tiny checkpoint trained once per module), and a checkpoint whose
train_state.pt carries a pickle payload (never executed: eval never opens it, --resume refuses it).
Most cases call main([...]) in-process (same code path as `python X.py`, much faster); a few run the
real scripts where the process environment matters.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import baselines as B
import data
import eval as ev
import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dataset", "synthetic:150x80", "--history", "8",
         "--prompt-history", "3", "--tiny-layers", "1", "--tiny-hidden", "32", "--tiny-heads", "2",
         "--max-new-tokens", "2", "--num-generations", "2", "--batch-size", "8", "--micro-batch-size", "4",
         "--val-samples", "60", "--eval-batch-size", "64", "--time-budget", "0", "--device", "cpu",
         "--max-steps", "2", "--eval-every", "0", "--test-samples", "none", "--kernels", "torch",
         "--pretrain-steps", "0", "--kl-beta", "0", "--temperature", "2.0"]


# ----------------------------------------------------------------------------------------------------------
# helpers

def tree(*roots):
    """Every path under the roots, with size and mtime for files: equal snapshots = nothing written."""
    out = set()
    for root in roots:
        for dp, dns, fns in os.walk(root):
            out.update((os.path.join(dp, n), "dir") for n in dns)
            for n in fns:
                st = os.lstat(os.path.join(dp, n))
                out.add((os.path.join(dp, n), st.st_size, st.st_mtime_ns))
    return out


def one_error_line(err, frags=()):
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for f in frags:
        assert f in lines[0], lines[0]
    return lines[0]


def refused(main, argv, capsys, frags, watch):
    """main(argv) exits 2 with one `error:` line holding every fragment; the watched folders are unchanged."""
    before = tree(*watch)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    line = one_error_line(err, frags)
    assert tree(*watch) == before, f"files changed after: {line}"
    return line


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One data root and one real tiny checkpoint (out/run/best and last) for the whole module."""
    base = tmp_path_factory.mktemp("robust")
    mp = pytest.MonkeyPatch()
    mp.setenv("R2EC_DATA_ROOT", str(base / "data"))
    mp.chdir(base)
    try:
        T.train(T.resolve_config(SMALL + ["--out", str(base / "out" / "run")]))
    finally:
        mp.undo()
    return {"base": base, "data": base / "data", "run": base / "out" / "run"}


@pytest.fixture
def env(world, tmp_path, monkeypatch):
    """cwd = an empty tmp folder (default out/ paths land there), the module's data root; -> watched dirs."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("R2EC_DATA_ROOT", str(world["data"]))
    return {"tmp": tmp_path, "cwd": cwd, "watch": [tmp_path, world["data"], world["run"]], **world}


def ckpt_copy(env, damage=None, which="best"):
    """A plain-folder copy of the module's checkpoint (the `best` link followed), then damage(folder)."""
    dst = env["tmp"] / f"ckpt-{which}"
    shutil.copytree(env["run"] / which, dst, symlinks=False)
    if damage:
        damage(dst)
    return dst


def edit_json(name, fn):
    def damage(d):
        p = d / name
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return damage


def write(name, content):
    def damage(d):
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return damage


def remove(name):
    return lambda d: os.remove(d / name)


def item_table(E):
    return lambda d: save_file({"E": E}, str(d / "item_table.safetensors"))


def truncate(name, keep=0.5):
    def damage(d):
        b = (d / name).read_bytes()
        (d / name).write_bytes(b[:int(len(b) * keep)])
    return damage


class Payload:
    """Unpickling this object creates the marker file: code execution, if anything ever unpickles it."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------------------------------------
# train.py: flags

TRAIN_FLAGS = [
    (["--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["--micro-batch-size", "0"], ["--micro-batch-size"]),
    (["--item-refresh", "0"], ["--item-refresh"]),
    (["--num-iterations", "0"], ["--num-iterations"]),
    (["--eval-batch-size", "0"], ["--eval-batch-size"]),
    (["--max-steps", "0"], ["--max-steps"]),
    (["--val-samples", "abc"], ["--val-samples", "not an integer"]),
    (["--val-samples", "-3"], ["--val-samples"]),
    (["--max-new-tokens", "abc"], ["--max-new-tokens"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens"]),
    (["--lr", "-1"], ["--lr"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--time-budget", "inf"], ["--time-budget", "finite"]),
    (["--time-budget", "-1"], ["--time-budget"]),
    (["--kl-beta", "nan"], ["--kl-beta"]),
    (["--top-k", "-5"], ["--top-k"]),
    (["--tau", "0"], ["--tau"]),
    (["--tau", "-0.02"], ["--tau"]),
    (["--temperature", "0"], ["--temperature"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--lora-r", "-1"], ["--lora-r"]),
    (["--lora-alpha", "0"], ["--lora-alpha"]),
    (["--reward-beta", "1.5"], ["--reward-beta"]),
    (["--reward-k", "0"], ["--reward-k"]),
    (["--clip-low", "-0.1"], ["--clip-low"]),
    (["--clip-high", "-1"], ["--clip-high"]),
    (["--embed-lr-mult", "-1"], ["--embed-lr-mult"]),
    (["--eval-every", "-1"], ["--eval-every"]),
    (["--patience", "-1"], ["--patience"]),
    (["--train-recent", "-1"], ["--train-recent"]),
    (["--item-negatives", "0"], ["--item-negatives"]),
    (["--seed", "-1"], ["--seed"]),
    (["--history", "0"], ["--history"]),
    (["--prompt-history", "0"], ["--prompt-history"]),
    (["--max-prompt-len", "0"], ["--max-prompt-len"]),
    (["--tiny-layers", "0"], ["--tiny-layers"]),
    (["--tiny-heads", "0"], ["--tiny-heads"]),
    (["--test-samples", "some"], ["--test-samples"]),
    (["--reward", "bogus"], ["--reward"]),
    (["--advantage", "bogus"], ["--advantage"]),
    (["--item-loss", "bogus"], ["--item-loss"]),
    (["--kernels", "bogus"], ["--kernels"]),
    (["--preset", "bogus"], ["--preset"]),
    (["--no-such-flag"], ["unrecognized arguments", "--no-such-flag"]),
    (["--lr"], ["--lr", "expected one argument"]),
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--device", "mps"], ["--device", "mps"]),
    (["--device", "cuda:x"], ["--device"]),
    (["--batch-size", "6", "--micro-batch-size", "4"], ["--batch-size 6", "--micro-batch-size 4"]),
    (["--num-generations", "1"], ["--num-generations", ">= 2"]),
    (["--relabel-topk", "9"], ["--relabel-topk"]),
    (["--tiny-hidden", "30", "--tiny-heads", "4"], ["--tiny-hidden", "--tiny-heads"]),
    (["--tiny-hidden", "30", "--tiny-heads", "2"], ["head size 15", "even"]),
    (["--tiny-hidden", "40", "--tiny-heads", "5"], ["--tiny-heads 5"]),
    (["--reference-broadcast", "--item-loss", "sampled"], ["--reference-broadcast"]),
    (["--dataset", "no-such"], ["unknown dataset 'no-such'"]),
    (["--dataset", "csv:/no/such/dir"], ["/no/such/dir", "not found"]),
    (["--dataset", "ml-1m", "--data-dir", "/no/such/dir"], ["--data-dir", "/no/such/dir"]),
    (["--init-from", "/no/such/dir"], ["--init-from /no/such/dir"]),
    (["--init-from", "/no/such/model.gguf"], ["--init-from /no/such/model.gguf"]),
]


@pytest.mark.parametrize("flags,frags", TRAIN_FLAGS, ids=[" ".join(f) for f, _ in TRAIN_FLAGS])
def test_train_bad_flag(env, capsys, monkeypatch, flags, frags):
    out, root = env["tmp"] / "run", env["tmp"] / "fresh-data"
    monkeypatch.setenv("R2EC_DATA_ROOT", str(root))   # an empty data root: refused = no cache folder either
    refused(T.main, SMALL + flags + ["--out", out], capsys, frags, env["watch"])
    assert not out.exists() and not os.listdir(env["cwd"]) and not root.exists()


def test_train_max_prompt_len_too_small(env, capsys):
    out = env["tmp"] / "run"
    refused(T.main, SMALL + ["--max-prompt-len", "5", "--out", out], capsys, ["--max-prompt-len"], env["watch"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_train_device_cuda_without_cuda(env, capsys):
    refused(T.main, SMALL + ["--device", "cuda", "--out", env["tmp"] / "run"], capsys,
            ["--device cuda", "CUDA is not available", "--device cpu"], env["watch"])


def test_train_out_is_a_file(env, capsys):
    f = env["tmp"] / "afile"
    f.write_text("keep")
    refused(T.main, SMALL + ["--out", f], capsys, ["--out", "afile", "file"], env["watch"])
    refused(T.main, SMALL + ["--out", f / "sub"], capsys, ["--out", "afile"], env["watch"])
    assert f.read_text() == "keep"


@pytest.mark.parametrize("files,frag", [([], "no config.json"), (["config.json"], "no tokenizer files")])
def test_train_init_from_dir_without_model(env, capsys, monkeypatch, files, frag):
    d = env["tmp"] / "empty-model"
    d.mkdir()
    for f in files:
        (d / f).write_text("{}")
    root = env["tmp"] / "fresh-data"
    monkeypatch.setenv("R2EC_DATA_ROOT", str(root))
    refused(T.main, SMALL + ["--init-from", d, "--out", env["tmp"] / "run"], capsys, ["--init-from", frag],
            env["watch"])
    assert not root.exists()   # refused before the data was built


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("script,argv", [("train.py", SMALL + ["--kernels", "triton", "--out"]),
                                         ("baselines.py", ["--dataset", "synthetic", "--impl", "triton", "--out-dir"])])
def test_triton_without_cuda_or_interpreter(tmp_path, script, argv):
    """The real scripts, with TRITON_INTERPRET unset (the in-process tests run under the interpreter)."""
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e["R2EC_DATA_ROOT"] = str(tmp_path / "data")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv, str(out)], cwd=tmp_path, env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    one_error_line(p.stderr, ["triton", "CUDA", "TRITON_INTERPRET"])
    assert not out.exists() and not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------------------------------------
# train.py --resume: damaged checkpoint folders

def _drop(*keys):
    return lambda c: {k: v for k, v in c.items() if k not in keys}


def _set(**kv):
    return lambda c: {**c, **kv}


RESUME_DAMAGE = {
    "missing": (None, ["--resume", "no such directory"]),
    "run_config empty": (write("run_config.json", ""), ["run_config.json", "cannot read"]),
    "run_config invalid": (write("run_config.json", "{not json"), ["run_config.json", "cannot read"]),
    "run_config list": (write("run_config.json", "[1, 2]"), ["run_config.json", "not a JSON object"]),
    "run_config {}": (write("run_config.json", "{}"), ["run_config.json"]),
    "run_config missing": (remove("run_config.json"), ["run_config.json", "missing"]),
    "no dataset key": (edit_json("run_config.json", _drop("dataset")), ["run_config.json", "'dataset'"]),
    "no lr key": (edit_json("run_config.json", _drop("lr")), ["run_config.json", "'lr'"]),
    "no out key": (edit_json("run_config.json", _drop("out")), ["run_config.json", "'out'"]),
    "no batch_size key": (edit_json("run_config.json", _drop("batch_size")), ["run_config.json", "'batch_size'"]),
    "batch_size str": (edit_json("run_config.json", _set(batch_size="x")), ["run_config.json", "--batch-size"]),
    "batch_size -1": (edit_json("run_config.json", _set(batch_size=-1)), ["run_config.json", "--batch-size"]),
    "tau 0": (edit_json("run_config.json", _set(tau=0)), ["run_config.json", "tau"]),
    "lr list": (edit_json("run_config.json", _set(lr=[1])), ["run_config.json", "lr"]),
    "history null": (edit_json("run_config.json", _set(history=None)), ["run_config.json", "history"]),
    "kernels bogus": (edit_json("run_config.json", _set(kernels="bogus")), ["run_config.json", "kernels"]),
    "no train_state": (remove("train_state.pt"), ["train_state.pt"]),
    "train_state truncated": (truncate("train_state.pt"), ["train_state.pt", "refusing"]),
    "train_state text": (write("train_state.pt", "hello"), ["train_state.pt", "refusing"]),
}


@pytest.mark.parametrize("case", list(RESUME_DAMAGE))
def test_resume_damaged_checkpoint(env, capsys, monkeypatch, case):
    damage, frags = RESUME_DAMAGE[case]
    ck = env["tmp"] / "nope" if damage is None else ckpt_copy(env, damage, "last")
    out, root = env["tmp"] / "resumed", env["tmp"] / "fresh-data"
    monkeypatch.setenv("R2EC_DATA_ROOT", str(root))   # refused before the data is even looked at
    refused(T.main, ["--resume", ck, "--out", out], capsys, frags, env["watch"])
    assert not out.exists() and not root.exists()


# damage found only once the data is loaded (the item map is compared with it): still one line, nothing written
RESUME_LATE = {
    "item_map other items": (edit_json("item_map.json", lambda m: {**m, "num_items": 3, "items": m["items"][:3]}),
                             ["item map", "differs"]),
    "item_table truncated": (truncate("item_table.safetensors"), ["item_table.safetensors", "damaged"]),
    "item_table wrong shape": (item_table(torch.zeros(5, 32)), ["item_table.safetensors", "shape (5, 32)"]),
    "weights truncated": (truncate("model.safetensors"), ["could not load the model"]),
    "config.json missing": (remove("config.json"), ["config.json"]),
}


@pytest.mark.parametrize("case", list(RESUME_LATE))
def test_resume_damaged_weights_or_items(env, capsys, case):
    damage, frags = RESUME_LATE[case]
    out = env["tmp"] / "resumed"
    refused(T.main, ["--resume", ckpt_copy(env, damage, "last"), "--out", out], capsys, frags, env["watch"])
    assert not out.exists()


def test_resume_of_a_file_or_to_a_file(env, capsys):
    f = env["tmp"] / "afile"
    f.write_text("x")
    refused(T.main, ["--resume", f], capsys, ["--resume", "afile", "a file"], env["watch"])
    refused(T.main, ["--resume", ckpt_copy(env, which="last"), "--out", f], capsys, ["--out", "afile"], env["watch"])


@pytest.mark.parametrize("flags,frag", [(["--tiny-hidden", "64"], "--tiny-hidden"),
                                         (["--batch-size", "16"], "--batch-size"),
                                         (["--dataset", "ml-100k"], "--dataset"),
                                         (["--history", "9"], "--history")])
def test_resume_cannot_change_fixed_flags(env, capsys, flags, frag):
    ck = ckpt_copy(env, which="last")
    out = env["tmp"] / "resumed"
    refused(T.main, ["--resume", ck, *flags, "--out", out], capsys, [frag, "cannot change"], env["watch"])
    assert not out.exists()


def test_resume_bad_flag_still_checked(env, capsys):
    ck = ckpt_copy(env, which="last")
    refused(T.main, ["--resume", ck, "--lr", "0"], capsys, ["--lr"], env["watch"])
    refused(T.main, ["--resume", ck, "--micro-batch-size", "3"], capsys, ["--micro-batch-size 3"], env["watch"])


def test_pickle_payload_in_train_state(env, capsys, monkeypatch):
    """eval.py scores the checkpoint without ever opening train_state.pt; --resume refuses the payload."""
    marker = env["tmp"] / "PWNED"
    ck = ckpt_copy(env, lambda d: torch.save(Payload(str(marker)), d / "train_state.pt"), "last")
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (opened.append(str(f)), real_load(f, *a, **k))[1])
    ev.main(["--ckpt", str(ck), "--device", "cpu", "--split", "valid"])
    out = capsys.readouterr().out
    assert "| R2ec" in out and "[eval] synthetic:150x80 | split=valid" in out
    assert not marker.exists() and not any("train_state" in f for f in opened)
    res = env["tmp"] / "resumed"
    refused(T.main, ["--resume", ck, "--out", res], capsys, ["train_state.pt", "refusing"], env["watch"])
    assert not marker.exists() and not res.exists()


# ----------------------------------------------------------------------------------------------------------
# eval.py

EVAL_DAMAGE = {
    "run_config empty": (write("run_config.json", ""), ["run_config.json", "cannot read"]),
    "run_config invalid": (write("run_config.json", "{\"dataset\": "), ["run_config.json", "cannot read"]),
    "run_config list": (write("run_config.json", "[]"), ["run_config.json", "not a JSON object"]),
    "run_config not utf-8": (write("run_config.json", b"\xff\xfe\x00{"), ["run_config.json"]),
    "no history key": (edit_json("run_config.json", _drop("history")), ["run_config.json", "'history'"]),
    "no prompt_history": (edit_json("run_config.json", _drop("prompt_history")), ["run_config.json", "prompt_history"]),
    "no eval_batch_size": (edit_json("run_config.json", _drop("eval_batch_size")),
                           ["run_config.json", "eval_batch_size"]),
    "eval_batch_size -1": (edit_json("run_config.json", _set(eval_batch_size=-1)),
                           ["run_config.json", "eval_batch_size"]),
    "history str": (edit_json("run_config.json", _set(history="abc")), ["run_config.json", "history"]),
    "tau nan": (edit_json("run_config.json", _set(tau="nan")), ["run_config.json", "tau"]),
    "dataset 3": (edit_json("run_config.json", _set(dataset=3)), ["run_config.json", "dataset"]),
    "no max_new_tokens": (edit_json("run_config.json", _drop("max_new_tokens")),
                          ["run_config.json", "max_new_tokens"]),
    "item_map missing": (remove("item_map.json"), ["item_map.json", "missing"]),
    "item_map invalid": (write("item_map.json", "{"), ["item_map.json", "cannot read"]),
    "item_map items missing": (edit_json("item_map.json", _drop("items")), ["item_map.json", "malformed"]),
    "item_map other items": (edit_json("item_map.json", lambda m: {**m, "num_items": 3, "items": m["items"][:3]}),
                             ["item map", "differs"]),
    "item_table missing": (remove("item_table.safetensors"), ["item_table.safetensors", "missing"]),
    "item_table truncated": (truncate("item_table.safetensors"), ["item_table.safetensors", "damaged"]),
    "item_table garbage": (write("item_table.safetensors", b"\x00" * 64), ["item_table.safetensors"]),
    "item_table wrong shape": (item_table(torch.zeros(5, 32)), ["item_table.safetensors", "shape (5, 32)"]),
    "item_table nan": (item_table(torch.full((81, 32), float("nan"))), ["item_table.safetensors", "finite: False"]),
    "item_table other key": (lambda d: save_file({"W": torch.zeros(81, 32)}, str(d / "item_table.safetensors")),
                             ["item_table.safetensors"]),
    "config.json missing": (remove("config.json"), ["config.json"]),
    "weights truncated": (truncate("model.safetensors"), ["could not load the model"]),
    "weights missing": (remove("model.safetensors"), ["could not load the model"]),
    "tokenizer missing": (lambda d: [os.remove(d / f) for f in os.listdir(d) if f.startswith(("tokenizer",
                                                                                              "special"))],
                          ["tokenizer"]),
}


@pytest.mark.parametrize("case", list(EVAL_DAMAGE))
def test_eval_damaged_checkpoint(env, capsys, case):
    damage, frags = EVAL_DAMAGE[case]
    ck = ckpt_copy(env, damage)
    refused(ev.main, ["--ckpt", ck, "--device", "cpu"], capsys, frags, env["watch"])


def test_eval_ckpt_missing_or_file(env, capsys):
    refused(ev.main, ["--ckpt", env["tmp"] / "nope"], capsys, ["--ckpt", "no such directory"], env["watch"])
    refused(ev.main, ["--ckpt", env["run"]], capsys, ["run_config.json", "missing"], env["watch"])   # the run folder
    f = env["tmp"] / "afile"
    f.write_text("x")
    refused(ev.main, ["--ckpt", f], capsys, ["--ckpt", "afile"], env["watch"])
    refused(ev.main, [], capsys, ["--ckpt"], env["watch"])


EVAL_FLAGS = [
    (["--batch-size", "-1"], ["--batch-size"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--batch-size", "abc"], ["--batch-size"]),
    (["--split", "bogus"], ["--split"]),
    (["--split", "train"], ["--split"]),
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--device", "meta"], ["--device", "meta"]),
    (["--days-apart", "-1"], ["--days-apart"]),
    (["--days-apart", "inf"], ["--days-apart"]),
    (["--history", "1|2", "--days-apart", "1e300"], ["--days-apart"]),
    (["--ratings", "5|4"], ["--ratings needs --history"]),
    (["--history", "1|2", "--ratings", "a|b"], ["--ratings", "numbers"]),
    (["--history", "1|2", "--ratings", "5"], ["--ratings", "1 values", "2 --history items"]),
    (["--history", "1|2", "--ratings", "9|4"], ["--ratings", "[0, 5]"]),
    (["--history", "1|2", "--ratings", "nan|4"], ["--ratings"]),
    (["--history", "1|2", "--ratings", "inf|4"], ["--ratings"]),
    (["--history", "No Such Movie At All"], ["--history", "unknown title"]),
    (["--history", "99999"], ["--history", "99999", "not in 1..80"]),
    (["--history", "0"], ["--history", "0"]),
    (["--history", "|"], ["--history is empty"]),
    (["--history", "-3"], ["--history"]),
]


@pytest.mark.parametrize("flags,frags", EVAL_FLAGS, ids=[" ".join(f) for f, _ in EVAL_FLAGS])
def test_eval_bad_flag(env, capsys, flags, frags):
    refused(ev.main, ["--ckpt", env["run"] / "best", "--device", "cpu", *flags], capsys, frags, env["watch"])


def test_eval_good_flags_still_work(env, capsys):
    """The checks above refuse only bad input: a hand-written history is scored, and the numbers of a split do
    not depend on --batch-size (a batch size < 1 is refused even through the Python API)."""
    best = str(env["run"] / "best")
    ev.main(["--ckpt", best, "--device", "cpu", "--history", "1 | 2 | 3", "--ratings", "5 | 4 | 3"])
    assert "top-10 (history masked):" in capsys.readouterr().out
    rows = []
    for bs in ([], ["--batch-size", "7"]):
        ev.main(["--ckpt", best, "--device", "cpu", "--split", "valid", *bs])
        rows.append([ln.split("|")[2:] for ln in capsys.readouterr().out.splitlines() if ln.startswith("| R2ec")])
    assert rows[0] == rows[1] and len(rows[0]) == 1
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    with pytest.raises(ev.EvalError, match="--batch-size -1"):
        ev.evaluate_checkpoint(best, ds, "valid", "cpu", batch_size=-1)
    assert not os.listdir(env["cwd"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_eval_device_cuda_without_cuda(env, capsys):
    refused(ev.main, ["--ckpt", env["run"] / "best", "--device", "cuda"], capsys, ["CUDA is not available"],
            env["watch"])


def test_eval_script_one_line(env):
    """The real entry point: `python eval.py` with a missing checkpoint folder."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--ckpt", str(env["tmp"] / "nope")],
                       cwd=env["cwd"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    one_error_line(p.stderr, ["--ckpt", "nope"])


# ----------------------------------------------------------------------------------------------------------
# data.py and baselines.py

GOOD_INTER = "user,item,timestamp\n" + "".join(f"u{u},i{(u + k) % 9},{1_600_000_000 + 60 * k}\n"
                                               for u in range(12) for k in range(6))
GOOD_ITEMS = "item,title\n" + "".join(f"i{i},Title {i}\n" for i in range(9))
CSV_BAD = {
    "extra column": (GOOD_INTER.replace("timestamp\n", "timestamp,genre\n", 1), GOOD_ITEMS,
                     ["interactions.csv:1", "unknown column 'genre'"]),
    "extra field": (GOOD_INTER + "u1,i1,1600000000,9\n", GOOD_ITEMS, ["interactions.csv:", "expected 3 fields"]),
    "timestamp 1e17": (GOOD_INTER + "u1,i1,1e17\n", GOOD_ITEMS, ["interactions.csv:", "1e17", "[1970, 2100)"]),
    "timestamp ms": (GOOD_INTER + "u1,i1,1600000000000\n", GOOD_ITEMS, ["interactions.csv:", "milliseconds"]),
    "timestamp nan": (GOOD_INTER + "u1,i1,nan\n", GOOD_ITEMS, ["interactions.csv:", "not finite"]),
    "timestamp text": (GOOD_INTER + "u1,i1,soon\n", GOOD_ITEMS, ["interactions.csv:", "not a number"]),
    "rating inf": (GOOD_INTER.replace("timestamp\n", "timestamp,rating\n", 1).replace("\n", ",4\n")
                   .replace("rating,4", "rating") + "u1,i1,1600000000,inf\n", GOOD_ITEMS, ["rating", "not finite"]),
    "empty interactions": ("", GOOD_ITEMS, ["interactions.csv", "empty"]),
    "empty items": (GOOD_INTER, "", ["items.csv", "empty"]),
    "missing items.csv": (GOOD_INTER, None, ["items.csv", "not found"]),
    "items extra column": (GOOD_INTER, GOOD_ITEMS.replace("item,title\n", "item,title,year\n").replace("\n", ",1\n")
                           .replace("year,1", "year"), ["items.csv:1", "unknown column 'year'"]),
    "untitled item": (GOOD_INTER, GOOD_ITEMS.replace("i3,Title 3\n", "i3,\n"), ["items.csv", "empty title"]),
    "unknown item": (GOOD_INTER, GOOD_ITEMS.replace("i3,Title 3\n", ""), ["i3"]),
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe" * 8, GOOD_ITEMS, ["interactions.csv", "utf-8"]),
}


@pytest.mark.parametrize("case", list(CSV_BAD))
def test_data_cli_bad_csv(env, capsys, case):
    inter, items, frags = CSV_BAD[case]
    d = env["tmp"] / "mydata"
    d.mkdir()
    (d / "interactions.csv").write_bytes(inter if isinstance(inter, bytes) else inter.encode())
    if items is not None:
        (d / "items.csv").write_text(items)
    refused(data.main, ["--dataset", f"csv:{d}"], capsys, frags, env["watch"])
    # the same file through train.py: refused before any output folder exists
    out = env["tmp"] / "run"
    refused(T.main, SMALL + ["--dataset", f"csv:{d}", "--out", out], capsys, frags, env["watch"])
    assert not out.exists()


def test_good_csv_is_accepted(env, capsys, monkeypatch):
    """The fixture above is valid without its damage (so each bad case fails for its own reason)."""
    d = env["tmp"] / "mydata"
    d.mkdir()
    (d / "interactions.csv").write_text(GOOD_INTER)
    (d / "items.csv").write_text(GOOD_ITEMS)
    monkeypatch.setenv("R2EC_DATA_ROOT", str(env["tmp"] / "data2"))
    data.main(["--dataset", f"csv:{d}", "--history", "3"])
    assert "items 9" in capsys.readouterr().out


DATA_FLAGS = [
    (["--history", "0"], ["--history"]),
    (["--num-users", "0"], ["--num-users"]),
    (["--num-items", "0"], ["--num-items"]),
    (["--num-items", "5"], ["--num-items 5"]),
    (["--seed", "-1"], ["--seed"]),
    (["--split", "bogus"], ["--split"]),
    (["--dataset", "no-such"], ["unknown dataset 'no-such'"]),
    (["--dataset", "csv:"], ["unknown dataset 'csv:'"]),
    (["--dataset", "csv:/no/such/dir"], ["not found"]),
    (["--dataset", "amazon-2023:Video_Games"], ["--data-dir"]),
    (["--dataset", "ml-1m", "--data-dir", "/no/such/dir"], ["--data-dir", "/no/such/dir"]),
]


@pytest.mark.parametrize("flags,frags", DATA_FLAGS, ids=[" ".join(f) for f, _ in DATA_FLAGS])
def test_data_cli_bad_flag(env, capsys, flags, frags):
    refused(data.main, ["--dataset", "synthetic", *flags], capsys, frags, env["watch"])


BASELINE_FLAGS = [
    (["--heads", "3", "--dim", "64"], ["--heads 3", "--dim 64"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--dropout", "2"], ["--dropout"]),
    (["--dropout", "nan"], ["--dropout"]),
    (["--history", "0"], ["--history"]),
    (["--dim", "0"], ["--dim"]),
    (["--blocks", "0"], ["--blocks"]),
    (["--lr", "0"], ["--lr"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--threads", "-1"], ["--threads"]),
    (["--patience", "-1"], ["--patience"]),
    (["--weight-decay", "inf"], ["--weight-decay"]),
    (["--impl", "bogus"], ["--impl"]),
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--dataset", "no-such"], ["unknown dataset 'no-such'"]),
]


@pytest.mark.parametrize("flags,frags", BASELINE_FLAGS, ids=[" ".join(f) for f, _ in BASELINE_FLAGS])
def test_baselines_bad_flag(env, capsys, flags, frags):
    out = env["tmp"] / "bl"
    refused(B.main, ["--dataset", "synthetic", "--epochs", "1", "--out-dir", out, *flags], capsys, frags, env["watch"])
    assert not out.exists()


def test_baselines_out_dir_is_a_file(env, capsys):
    f = env["tmp"] / "afile"
    f.write_text("keep")
    refused(B.main, ["--dataset", "synthetic", "--epochs", "1", "--out-dir", f],
            capsys, ["--out-dir", "afile"], env["watch"])


# ----------------------------------------------------------------------------------------------------------
# model.py

@pytest.mark.parametrize("main", [T.main, ev.main, B.main, data.main], ids=["train", "eval", "baselines", "data"])
def test_help_prints_and_exits_0(main, capsys):
    """--help renders every flag's help string (a stray '%' in one made argparse crash)."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
