"""Checkpoints: data, never code; replaced atomically (nanochat's checkpoint_manager.py).

out/<run>/last is a symbolic link to a hidden folder .last.<ns>/ holding the files. A save writes a new
folder, fsyncs every file, then swaps the link with one rename (atomic on POSIX) and only then deletes
the old folder: killed at any instant, `last` names a complete checkpoint. Leftovers of killed saves
are removed by clean_checkpoints() at the next start. Nothing here is unpickled into code: weights and
tables are safetensors, config and item map JSON, and the training state (optimizer, RNG, counters) a
torch file of plain tensors/numbers read with weights_only=True, and only by --resume. Under torchrun
only rank 0 writes or cleans; save_checkpoint is a collective (the others wait for the swap), so every
process can read the checkpoint right after (the output folder must be shared by all the nodes).

    save_checkpoint(path, r2ec, run_config, train_state) / load_checkpoint(path, device, dtype, dataset)
    read_run_config / read_item_map / load_item_table / load_train_state / clean_checkpoints
    rng_state / set_rng_state: every RNG a resumed run needs, as plain tensors"""
import json
import math
import os
import pickle
import random
import shutil
import time

import numpy as np
import torch

from backbone import build_backbone, lora_state_dict, merged_state_dict
from common import ModelError, barrier, fsync_dir, fsync_tree, is_main
from model import ItemTable, R2ec

def _json(path, what):
    try:
        with open(path) as f:
            out = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path}: missing, so this is not a checkpoint folder ({what})") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read {what} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         "the checkpoint is damaged") from None
    if not isinstance(out, dict) or not out:
        raise ModelError(f"{path}: empty or not a JSON object ({what})")
    return out


def save_checkpoint(path, r2ec, run_config, train_state=None):
    """Weights (LoRA merged, safetensors), tokenizer, model config, run_config.json, item_map.json,
    item_table.safetensors, adapter.safetensors (LoRA, for resuming), train_state.pt (plain tensors).
    torchrun: every process calls it; rank 0 writes, the others wait until the checkpoint is complete."""
    if is_main():
        _write_checkpoint(path, r2ec, run_config, train_state)
    barrier()


def _write_checkpoint(path, r2ec, run_config, train_state):
    from safetensors.torch import save_file
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    new = os.path.join(parent, f".{name}.{time.time_ns()}")
    os.makedirs(new)
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # no "Writing model shards" bar at every save
    try:
        r2ec.model.save_pretrained(new, state_dict=merged_state_dict(r2ec.model))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    r2ec.tok.save_pretrained(new)
    with open(os.path.join(new, "run_config.json"), "w") as f:
        json.dump(run_config, f, indent=1, default=str)
    ds = r2ec.dataset
    if ds is not None:
        items = [{"id": i, "raw_id": ds.items[i].get("raw_id"), "title": ds.titles[i]} for i in range(1, ds.num_items + 1)]
    else:
        items = [{"id": i + 1, "raw_id": r, "title": t} for i, (r, t) in enumerate(r2ec.item_map or [])]
    with open(os.path.join(new, "item_map.json"), "w") as f:
        json.dump({"dataset": getattr(ds, "name", None), "num_items": len(items), "items": items}, f)
    if r2ec.table is not None:
        save_file({"E": r2ec.table.E.detach().cpu().contiguous()}, os.path.join(new, "item_table.safetensors"))
    lora = lora_state_dict(r2ec.model)
    if lora:
        save_file({k: v.cpu().contiguous() for k, v in lora.items()}, os.path.join(new, "adapter.safetensors"))
    if train_state is not None:
        torch.save(train_state, os.path.join(new, "train_state.pt"))
    fsync_tree(new)
    old = os.path.realpath(path) if os.path.islink(path) else None
    if os.path.isdir(path) and not os.path.islink(path):   # a checkpoint of the older, plain-folder layout
        os.rename(path, os.path.join(parent, f".{name}.{time.time_ns()}"))
    link = os.path.join(parent, f".{name}.link-{os.getpid()}")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.basename(new), link)
    os.replace(link, path)                                   # the one atomic step
    fsync_dir(parent)
    if old and old != os.path.realpath(path):
        shutil.rmtree(old, ignore_errors=True)
    clean_checkpoints(parent)


def clean_checkpoints(folder):
    """Remove hidden checkpoint folders and links that no visible checkpoint link points to (killed saves).
    Main process only: under torchrun another process cleaning could delete rank 0's save in progress."""
    if not is_main() or not os.path.isdir(folder):
        return
    live = {os.path.realpath(os.path.join(folder, f)) for f in os.listdir(folder)
            if os.path.islink(os.path.join(folder, f)) and not f.startswith(".")}
    for f in os.listdir(folder):
        p = os.path.join(folder, f)
        if f.startswith(".") and (".link-" in f or (os.path.isdir(p) and not os.path.islink(p)
                                                     and os.path.realpath(p) not in live
                                                     and f.count(".") >= 2 and f.rsplit(".", 1)[1].isdigit())):
            if os.path.islink(p) or os.path.isfile(p):
                os.remove(p)
            else:
                shutil.rmtree(p, ignore_errors=True)


# what scoring a checkpoint reads from its run_config.json: "str" = a non-empty string, an int = an integer
# >= it, a float = a finite number > it (synthetic_*: runs saved before the sizes moved into the dataset's
# name). Checked when present;
# load_checkpoint needs the first four, eval.py all of them.
RUN_CONFIG_KEYS = {"dataset": "str", "history": 1, "init_from": "str", "tau": 0.0, "prompt_history": 1,
                   "max_new_tokens": 0, "eval_batch_size": 1, "synthetic_users": 1, "synthetic_items": 1}


def read_run_config(path, flag="--ckpt", need=("dataset", "history", "init_from", "tau")):
    """run_config.json of a checkpoint folder, checked (one-line ModelError otherwise); `need`: keys it must hold."""
    if not os.path.isdir(path):
        what = "a file" if os.path.exists(path) else "no such directory"
        raise ModelError(f"{flag} {path}: not a checkpoint folder ({what}); train.py writes "
                         "out/<dataset>/best and out/<dataset>/last")
    f = os.path.join(path, "run_config.json")
    cfg = _json(f, "the run's config")
    for k, lo in RUN_CONFIG_KEYS.items():
        if k not in cfg:
            if k in need and not k.startswith("synthetic_"):   # those: runs saved before synthetic:UxI
                raise ModelError(f"{f}: key {k!r} is missing; not written by train.py")
            continue
        v, num = cfg[k], isinstance(cfg[k], (int, float)) and not isinstance(cfg[k], bool)
        if lo == "str":
            ok, want = isinstance(v, str) and v, "a non-empty string"
        elif isinstance(lo, int):
            ok, want = num and isinstance(v, int) and v >= lo, f"an integer >= {lo}"
        else:
            ok, want = num and math.isfinite(v) and v > lo, f"a finite number > {lo:g}"
        if not ok:
            raise ModelError(f"{f}: {k} = {v!r}, expected {want}; the file was edited or damaged")
    return cfg


def read_item_map(path, dataset=None):
    """item_map.json of a checkpoint; with dataset=, refuses a checkpoint trained on other items."""
    imap = _json(os.path.join(path, "item_map.json"), "the item map")
    try:
        raw, n_items = [it["raw_id"] for it in imap["items"]], int(imap["num_items"])
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{os.path.join(path, 'item_map.json')}: malformed item map (needs num_items and items)") from None
    if dataset is not None and (dataset.num_items != n_items or
                                raw != [dataset.items[i].get("raw_id") for i in range(1, dataset.num_items + 1)]):
        raise ModelError(f"checkpoint {path}: its item map ({n_items} items of {imap.get('dataset')}) differs from "
                         f"dataset {dataset.name} ({dataset.num_items} items); use the data it was trained on")
    return imap


def load_item_table(path, num_items, dim, device="cpu"):
    """The item table E [N+1, d] saved in checkpoint folder `path`, checked (one-line ModelError otherwise)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    tpath = os.path.join(path, "item_table.safetensors")
    if not os.path.isfile(tpath):
        raise ModelError(f"{tpath}: missing; the checkpoint is incomplete")
    try:
        E = load_file(tpath)["E"]
    except (SafetensorError, KeyError, OSError) as e:
        raise ModelError(f"{tpath}: unreadable item table ({type(e).__name__}); the checkpoint is damaged") from None
    if E.shape != (num_items + 1, dim) or not torch.isfinite(E).all():
        raise ModelError(f"{tpath}: item table of shape {tuple(E.shape)} (finite: {bool(torch.isfinite(E).all())}), "
                         f"expected finite ({num_items + 1}, {dim})")
    table = ItemTable(num_items, dim, device)
    table.E.copy_(E)
    table.fresh = True
    return table


def load_checkpoint(path, device="cpu", dtype=None, dataset=None):
    """-> (R2ec with the saved item table, run_config dict). Reads no pickle. The tiny backbone loads in
    fp32 (as trained, autocast on CUDA); Hugging Face backbones in bf16 on CUDA."""
    run_config = read_run_config(path)
    imap = read_item_map(path, dataset)
    n_items = int(imap["num_items"])
    if dtype is None and (run_config["init_from"] == "tiny" or torch.device(device).type == "cpu"):
        dtype = torch.float32
    model, tok = build_backbone(path, None, dtype=dtype, device=device, verbose=False)
    r = R2ec(model, tok, dataset, tau=run_config["tau"], max_prompt_len=run_config.get("max_prompt_len"),
             impl=run_config.get("kernels", "auto"))
    r.item_map = [(it["raw_id"], it["title"]) for it in imap["items"]]
    r.table = load_item_table(path, n_items, model.config.hidden_size, r.device)
    return r, run_config



def rng_state():
    """Every RNG a resumed run needs, as plain tensors and numbers (loadable with weights_only=True)."""
    st = {"python": list(random.getstate()[1]), "torch": torch.get_rng_state(),
          "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)), "numpy_pos": np.random.get_state()[2]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    random.setstate((3, tuple(st["python"]), None))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_train_state(path, mmap=False):
    """The optimizer/RNG/counter state of a checkpoint, for --resume only; plain tensors, never code.
    mmap=True: tensor data mapped, not read (a cheap up-front check of the whole file's structure)."""
    spath = os.path.join(path, "train_state.pt")
    if not os.path.isfile(spath):
        raise ModelError(f"--resume {path}: no train_state.pt (a best/ checkpoint of an older run?); resume from last/")
    try:
        return torch.load(spath, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:   # weights_only refuses any object but tensors and plain containers
        raise ModelError(f"{spath}: holds Python objects, not only tensors and numbers; refusing to load it "
                         "(it could run code); resume from a checkpoint written by train.py") from None
    except Exception as e:   # truncation, not a torch file
        raise ModelError(f"{spath}: not a readable torch file, refusing to load it ({type(e).__name__}); "
                         "the checkpoint is damaged") from None


# --------------------------------------------------------------------------------------------------
