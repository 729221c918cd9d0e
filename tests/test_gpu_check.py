""".ci/gpu, read from the script itself: the dry mode (run by .ci/run) runs the real mode's flag sets, a mode adds
only sizes and paths, every flag parses in the program it is given to, the real time boxes fit 8 minutes, and the
prepared carry folder (the backbone's config and tokenizer, ML-100K) loads and fits the 64 MiB a device call takes."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = open(os.path.join(ROOT, ".ci", "gpu")).read()
# what a mode may add to the shared flags: sizes, step counts and where things are
SIZE_FLAGS = {"--dry", "--reps", "--warmup", "--test-timeout", "--budget-s", "--row-budget-s", "--max-new-tokens",
              "--val-samples", "--eval-batch-size", "--tiny-layers", "--tiny-hidden", "--tiny-heads", "--threads",
              "--collect-only", "-qq", "-x"}


def assignments(block):
    """NAME="value" assignments of a block of the script -> {NAME: value}."""
    return dict(re.findall(r'\b([A-Z_]+)="([^"]*)"', block))


def modes():
    dry = SCRIPT[SCRIPT.index("if [ $MODE = dry ]"):SCRIPT.index("\nelse\n")]
    real = SCRIPT[SCRIPT.index("\nelse\n"):SCRIPT.index("\nfi\n")]
    return assignments(dry), assignments(real)


def flags(text):
    return [t.split("=")[0] for t in shlex.split(text) if t.startswith("-")]


def test_both_modes_run_the_same_flag_sets():
    shared = assignments(SCRIPT[:SCRIPT.index("if [ $MODE = dry ]")])
    assert {"TESTS", "KERNELS", "TRAIN", "STEP", "STEP_TRAIN"} <= set(shared)
    assert "--preset paper" in shared["TRAIN"] and "--dataset ml-100k" in shared["TRAIN"]
    dry, real = modes()
    for name in ("A_MODE", "K_SHAPE", "T_SHAPE", "S_SHAPE"):   # the only per-mode additions, sizes alone
        assert set(flags(dry[name])) <= SIZE_FLAGS and set(flags(real[name])) <= SIZE_FLAGS, name
        assert set(flags(real[name])) - {"-x", "--test-timeout", "--budget-s", "--row-budget-s"} == \
            set(flags(dry[name])) - {"--collect-only", "-qq", "--dry", "--reps", "--warmup", "--threads"}, name
    # the parts' commands use the shared sets, never a literal flag of their own
    parts = [ln for ln in SCRIPT.splitlines() if ln.startswith("part ")]
    assert len(parts) == 5 and all("--preset" not in ln for ln in parts)
    assert 'TRAIN="$TRAIN --init-from $PREP/smollm2-135m --data-dir $PREP/ml-100k --device $DEV $T_SHAPE"' in SCRIPT


def test_every_flag_parses_in_its_program():
    sys.path.insert(0, ROOT)
    import train
    from bench import kernels as bk
    from bench import step as bs
    shared = assignments(SCRIPT[:SCRIPT.index("if [ $MODE = dry ]")])
    for mode in modes():
        argv = shlex.split(shared["TRAIN"] + " " + mode["T_SHAPE"]) + ["--init-from", "tiny", "--device", "cpu"]
        train.get_parser().parse_args(argv)
        bk.get_parser().parse_args(shlex.split(shared["KERNELS"] + " " + mode["K_SHAPE"]))
        bs.get_parser().parse_args(shlex.split(shared["STEP"]) + ["--train-args=" + shared["STEP_TRAIN"],
                                                                   "--large-args=" + mode["S_SHAPE"]])
        train.get_parser().parse_args(shlex.split(shared["STEP_TRAIN"] + " " + mode["S_SHAPE"]))


def test_real_time_boxes_fit_eight_minutes():
    _, real = modes()
    boxes = re.search(r"T_A=(\d+) T_B=(\d+) T_R=(\d+) T_P=(\d+) T_D=(\d+)", SCRIPT[SCRIPT.index("\nelse\n"):])
    assert sum(map(int, boxes.groups())) <= 450   # + installing the wheels and starting Python: under 8 minutes


def test_prepared_folder_loads_and_fits(tmp_path):
    out = tmp_path / "prep"
    p = subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "gpu_prepare.py"), str(out), "--dry"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 16 << 20 and "of the 64 MiB a call carries" in p.stdout
    assert sorted(os.listdir(out / "ml-100k")) == ["ml-100k.inter", "ml-100k.item"]
    assert not [f for f in os.listdir(out / "smollm2-135m") if f.endswith((".safetensors", ".bin"))]
    import backbone
    model, tok = backbone.build_backbone(str(out / "smollm2-135m"), None, verbose=False)
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == 49152
    assert model.config.num_hidden_layers == 1 and tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_the_real_mode_refuses_without_the_prepared_folder(tmp_path):
    if os.path.exists(os.path.join(ROOT, ".gpu", "prepared.json")):
        pytest.skip("a prepared .gpu/ is here")
    p = subprocess.run(["bash", os.path.join(ROOT, ".ci", "gpu")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--prepare" in p.stderr
