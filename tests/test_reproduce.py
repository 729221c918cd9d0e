"""docs/reproduce.md: every command in its ```bash blocks parses, at --help level, without running anything.

train.py lines (also under torchrun) go through train.get_parser().parse_args; data.py, eval.py and
baselines.py lines through the module's own main(argv), with run_cli replaced by a recorder, so argparse (and
main's own flag checks) run but nothing executes. An argparse error is SystemExit(2): the test fails and names
the line. A line no parser here knows fails too, so no command in the document goes unchecked."""
import importlib
import os
import re
import shlex

import pytest

import common
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "reproduce.md")
CLI_MODULES = {"data.py": "data", "eval.py": "eval", "baselines.py": "baselines"}


def commands():
    """The document's bash commands: continuation lines joined, blanks and comments skipped."""
    text = open(DOC, encoding="utf-8").read()
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        line = ""
        for raw in block.splitlines():
            part = raw.strip()
            if part.endswith("\\"):
                line += part[:-1] + " "
                continue
            line += part
            if line and not line.startswith("#"):
                out.append(line)
            line = ""
        assert not line.strip(), f"a bash block ends inside a continued line: {line!r}"
    return out


def split(line):
    """-> (script, args) of `python X.py ...` or `torchrun [launcher flags] X.py ...`, with ~ expanded."""
    words = [os.path.expanduser(w) for w in shlex.split(line)]
    if words[0] == "python" and len(words) > 1:
        return words[1], words[2:]
    if words[0] == "torchrun":
        i = next((k for k, w in enumerate(words) if w.endswith(".py")), None)
        assert i is not None, f"torchrun without a .py script: {line!r}"
        return words[i], words[i + 1:]
    pytest.fail(f"docs/reproduce.md: no parser in tests/test_reproduce.py for this command: {line!r}")


def parse(line, monkeypatch):
    """Parse one command line like its program would, executing nothing. Returns the argparse result (train.py)
    or the arguments main() handed to run_cli."""
    script, args = split(line)
    try:
        if script == "train.py":
            return train.get_parser().parse_args(args)
        assert script in CLI_MODULES, f"unknown script {script!r} in {line!r}"
        mod = importlib.import_module(CLI_MODULES[script])
        captured = []
        record = lambda fn, *a: captured.append(a)   # noqa: E731
        # main() calls run_cli through `common.run_cli` or an imported `run_cli`: replace both names
        monkeypatch.setattr(common, "run_cli", record)
        if hasattr(mod, "run_cli"):
            monkeypatch.setattr(mod, "run_cli", record)
        mod.main(args)
        assert len(captured) == 1, f"{script}'s main did not reach run_cli for {line!r}"
        return captured[0]
    except SystemExit as e:
        pytest.fail(f"docs/reproduce.md: argparse refused {line!r} (exit {e.code}); see the stderr above")


def test_doc_exists_and_is_dated():
    text = open(DOC, encoding="utf-8").read()
    assert re.search(r"\b20\d\d-\d\d-\d\d\b", text.split("\n## ")[0]), "the document's head carries no date"
    assert commands(), "no ```bash commands in docs/reproduce.md"


CMDS = commands() if os.path.isfile(DOC) else []


@pytest.mark.parametrize("line", CMDS, ids=[f"{i:02d}:{c.split('.py')[0].split()[-1]}" for i, c in enumerate(CMDS)])
def test_command_parses(line, monkeypatch):
    parse(line, monkeypatch)


def test_commands_cover_the_paper_and_evaluate_what_they_train(monkeypatch):
    """Each of the three datasets is downloaded and trained with both backbones, and every eval.py --ckpt names
    the best checkpoint of a training run in the document (its --out, or out/<slug of the dataset>)."""
    trained, evaluated, downloaded = {}, [], set()
    for line in CMDS:
        script, _ = split(line)
        got = parse(line, monkeypatch)
        if script == "train.py" and not got.resume:
            out = got.out or os.path.join("out", common.slug(got.dataset))
            trained[os.path.normpath(out)] = (got.dataset, got.init_from, got.data_dir)
        elif script == "eval.py":
            evaluated.append(os.path.normpath(os.path.dirname(os.path.normpath(got[0].ckpt))))
            assert os.path.basename(os.path.normpath(got[0].ckpt)) == "best", line
        elif script == "data.py":
            words = shlex.split(line)
            assert "--download" in words, f"fetch the data with --download: {line!r}"
            downloaded.add(words[words.index("--dataset") + 1])
    cats = ("Musical_Instruments", "CDs_and_Vinyl", "Video_Games")
    runs = set((d, i) for d, i, _ in trained.values())
    for cat in cats:
        assert f"amazon-2023:{cat}" in downloaded, cat
        for model in ("google/gemma-2-2b-it", "Qwen/Qwen2.5-3B-Instruct"):
            assert (f"amazon-2023:{cat}", model) in runs, (cat, model)
    for run in evaluated:
        assert run in trained, f"eval.py --ckpt {run}/best: no train.py command in the document writes {run}"
    for out, (dataset, _, data_dir) in trained.items():
        if dataset.startswith("amazon-2023:"):
            assert data_dir == os.path.expanduser("~/amazon"), (out, data_dir)


def test_presets_table_lists_every_paper_value_beside_the_reference():
    """README, *Presets*: a row for every key of PRESETS (both presets), each with an RRec column; and the paper
    preset resolves to the reference code's optimisation (12 users, constant LR, beta2 0.999, raw-logit log-probs)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Presets"):text.index("## The two-stage recipe")]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| setting")]
    assert all(len(r.strip("|").split(" | ")) == 5 for r in rows)   # setting | paper | RRec | cpu | why
    names = {"lr_schedule": "LR schedule", "adam_beta2": "AdamW β₂", "logp_temperature": "log-prob temperature",
             "epochs": "3 epochs", "time_budget": "--time-budget", "val_samples": "--val-samples",
             "pretrain_id_weight": "item-token sequences (`PRESETS`)"}
    for key in set(train.PRESETS["paper"]) | set(train.PRESETS["cpu"]):
        want = names.get(key, "--" + key.replace("_", "-"))
        assert want in section, f"README *Presets* has no row for {key} ({want})"
    cfg = train.resolve_config(["--preset", "paper", "--device", "cpu", "--dataset", "synthetic"])
    assert (cfg["batch_size"], cfg["micro_batch_size"], cfg["lr_schedule"], cfg["adam_beta2"]) == (12, 4, "constant",
                                                                                                  0.999)
    assert cfg["logp_temperature"] == 1.0 and cfg["temperature"] == 2.0 and cfg["gradient_checkpointing"]
    assert train.lr_at(0, cfg) == train.lr_at(500, cfg) == cfg["lr"]
    cpu = train.resolve_config(["--preset", "cpu", "--device", "cpu", "--dataset", "synthetic"])
    assert cpu["logp_temperature"] == cpu["temperature"] and train.lr_at(0, cpu) < cpu["lr"]
