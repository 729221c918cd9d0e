"""Checkpoints are data, and replacing one is crash-safe at every instant.

A save is interrupted between every pair of its file operations (the k-th os call raises, for every k),
and a saving process is SIGKILLed at random instants: each time the checkpoint path still names a complete
checkpoint that loads (config, item map, item table, train state), and the next save cleans the leftovers.
A train_state.pt that carries a pickle payload is refused by --resume's loader and never executed."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as M
from test_model import TINY, fake_dataset
import backbone
import checkpoint
import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def r2(tmp_path_factory):
    ds = fake_dataset(n_items=12, n_samples=4, H=3)
    model, tok = backbone.build_backbone("tiny", ds, {**TINY, "layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1,
                                                "intermediate": 48},
                                  cache_dir=str(tmp_path_factory.mktemp("tok")), verbose=False)
    r = M.R2ec(model, tok, ds, impl="torch")
    r.refresh_items(16)
    return r, ds


CFG = {"dataset": "fake", "history": 3, "init_from": "tiny", "tau": 0.02}


def loads(path, ds):
    r, cfg = checkpoint.load_checkpoint(path, dataset=ds)
    return cfg["version"], checkpoint.load_train_state(path)["version"], r.table.E


class Crash(BaseException):
    pass


OPS = [(os, "replace"), (os, "rename"), (os, "symlink"), (os, "remove"), (os, "makedirs"), (os, "fsync"),
       (shutil, "rmtree")]


def test_interrupted_between_any_two_file_operations(r2, tmp_path):
    r, ds = r2
    path = str(tmp_path / "last")
    checkpoint.save_checkpoint(path, r, {**CFG, "version": 1}, {"version": 1})
    n_ops, k, live = None, 0, 1
    while n_ops is None or k < n_ops:
        count = [0]
        saved = {}

        def wrap(mod, name):
            f = getattr(mod, name)
            saved[(mod, name)] = f

            def g(*a, **kw):
                count[0] += 1
                if count[0] == k + 1:
                    raise Crash(f"killed at op {k} ({name})")
                return f(*a, **kw)
            setattr(mod, name, g)
        for mod, name in OPS:
            wrap(mod, name)
        try:
            checkpoint.save_checkpoint(path, r, {**CFG, "version": 2 + k}, {"version": 2 + k})
            crashed = False
        except Crash:
            crashed = True
        finally:
            for (mod, name), f in saved.items():
                setattr(mod, name, f)
        v, tv, E = loads(path, ds)                       # always a complete checkpoint: the old or the new
        assert v == tv and v in (live, 2 + k), (k, v, tv, live)
        assert crashed or v == 2 + k
        live = v
        torch.testing.assert_close(E, r.table.E)
        if not crashed:
            n_ops = count[0]
        k += 1
    assert n_ops and n_ops >= 5                          # every instant of a save was tried
    checkpoint.save_checkpoint(path, r, {**CFG, "version": 99}, {"version": 99})
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == [os.readlink(path)]   # leftovers cleaned


SAVER = """
import sys, torch, backbone, checkpoint, model as M
from test_model import TINY, fake_dataset
ds = fake_dataset(n_items=12, n_samples=4, H=3)
model, tok = backbone.build_backbone("tiny", ds, {**TINY, "layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1,
                                            "intermediate": 48}, cache_dir=sys.argv[2], verbose=False)
r = M.R2ec(model, tok, ds, impl="torch")
r.refresh_items(16)
v = 0
while True:
    v += 1
    checkpoint.save_checkpoint(sys.argv[1], r, {"dataset": "fake", "history": 3, "init_from": "tiny", "tau": 0.02,
                                       "version": v}, {"version": v})
    print(v, flush=True)
"""


def test_sigkill_at_random_instants(r2, tmp_path):
    r, ds = r2
    path = str(tmp_path / "run" / "last")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    for trial, delay in enumerate((0.13, 0.29, 0.41, 0.07, 0.53)):
        p = subprocess.Popen([sys.executable, "-c", SAVER, path, str(tmp_path / "tok")], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = p.stdout.readline()                        # one complete save, then a kill mid-loop
        assert first.strip(), p.stderr.read()[-2000:]
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        v, tv, _ = loads(path, ds)
        assert v == tv >= 1, (trial, v, tv)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/r2ec-pickle-payload-ran"


def test_pickle_payload_is_never_executed(r2, tmp_path):
    r, ds = r2
    path = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(path, r, {**CFG, "version": 1}, {"version": 1})
    if os.path.exists(MARKER):
        os.remove(MARKER)
    torch.save({"step": Payload()}, os.path.join(path, "train_state.pt"))
    r2_, _ = checkpoint.load_checkpoint(path, dataset=ds)            # evaluation reads no pickle at all
    with pytest.raises(common.ModelError, match="refusing to load"):
        checkpoint.load_train_state(path)
    assert not os.path.exists(MARKER)
