"""One RecPO step of train.py, timed phase by phase (rollout, reward, item encoding, forward, losses, backward,
optimizer), for a tiny and a larger config; plus one full item-table refresh. The only file that imports train.py:
it runs train.py's own loop body (train.rollout + train.update) on train.resolve_config's flags. Protocol and
latest results: bench/README.md.

    python bench/step.py --threads 1                                # synthetic, tiny + 4x256 on CPU
    python bench/step.py --dataset ml-100k --steps 3 --device auto
    python bench/step.py --configs large --large-args='--tiny-layers 28 --tiny-hidden 2048 --tiny-heads 16'
"""
import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # first: `import kernels` is the project's package

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
from bench.kernels import RESULTS, loadavg, machine, save_results, versions  # noqa: E402

# the phases common.Phases times inside train.rollout / train.update (train.py logs them as phases_s), in step order
PHASES = [
    ("rollout", "G sampled reasoning chains per user + h_T: prompt prefill, KV cache repeated G times, one "
     "decode step per token (model.R2ec.decode)"),
    ("reward", "full-catalog scores of every h_T against the item table, history masked (kernels.catalog via "
     "recpo.compute_rewards) + group advantages"),
    ("item encoding", "the micro-batch's target items (+ sampled negatives) re-encoded WITH grad, forward only "
     "(model.R2ec.encode_items); their backward is in 'backward'"),
    ("forward (tokens)", "policy forward over prompt + completion, prompt shared by its G chains; token "
     "log-probs + entropy (model.R2ec.forward_both, kernels.logprobs)"),
    ("losses", "clipped token loss + item loss (in-batch / sampled / full softmax) (recpo)"),
    ("backward", "one backward through token forward, item encoder and both losses (per micro-batch)"),
    ("optimizer", "grad-norm clipping + AdamW step + zero_grad"),
]
LARGE = {"cpu": "--tiny-layers 4 --tiny-hidden 256 --tiny-heads 4",
         "cuda": "--tiny-layers 8 --tiny-hidden 1024 --tiny-heads 16"}
CONFIGS = ("tiny", "large")


def train_config(train, args, name):
    """train.py's resolved config for one benchmarked config (exactly train.py's flags and presets) and the
    flags that made it. A flag train.py refuses is one line naming --train-args / --large-args."""
    dev = common.pick_device(args.device)
    size = "" if name == "tiny" else args.large_args if args.large_args is not None else LARGE[dev.split(":")[0]]
    flags = shlex.split(args.train_args) + shlex.split(size)
    argv = ["--dataset", args.dataset, "--device", args.device, "--time-budget", "0",
            "--max-steps", str(args.steps + 1)] + flags
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):   # train's parser prints `error: <prog>: <msg> (see --help)`, exits 2
            return train.resolve_config(argv), " ".join(flags)
    except SystemExit:
        msg = (err.getvalue().strip().splitlines() or ["refused"])[-1].removeprefix("error: ")
        msg = msg.removeprefix(f"{os.path.basename(sys.argv[0])}: ").removesuffix(" (see --help)")
        raise common.UserError(f"--train-args / --large-args: train.py refuses {' '.join(flags)!r}: {msg}") from None


def time_config(train, name, cfg, ds, steps):
    """1 warm-up step, then `steps` timed RecPO steps of train.py's loop body, and one timed table refresh.
    -> dict(per-step phase ms, refresh ms, token / item counts, model size)."""
    torch.manual_seed(cfg["seed"])
    r, params, saved = train.build(cfg, ds, verbose=False)
    opt, _, _ = train.optimizer(r, params, cfg, saved)
    cuda = cfg["device"].startswith("cuda")
    ph = common.Phases(cuda)   # the full re-encode train.py runs every --item-refresh steps, timed on its own
    with ph("refresh"):
        r.refresh_items(cfg["eval_batch_size"])
    refresh = ph.s["refresh"] * 1e3
    runs, tokens, gen_tokens, items = [], [], [], []
    for step in tqdm(range(steps + 1), desc=f"{name} (1 warm-up + {steps})", file=sys.stderr, disable=None):
        ph = common.Phases(cuda)
        with ph("step"):
            batch = train.rollout(r, ds, cfg, step, ph=ph)
            train.update(r, cfg, batch, opt, params, train.lr_at(step, cfg), ph=ph)
        if step == 0:
            continue   # warm-up: allocator, thread pools, (CUDA) kernel compilation
        ms = {k: v * 1e3 for k, v in ph.s.items()}
        ms["other"] = ms["step"] - sum(v for k, v in ms.items() if k != "step")
        runs.append(ms)
        tokens.append(int(batch.ro["attention_mask"].sum()) * cfg["num_iterations"])
        gen_tokens.append(int(batch.ro["sampled_mask"].sum()))
        n_neg = 0 if batch.neg is None else len(batch.neg)
        items.append(sum(len(torch.unique(batch.targets[c["rows"]])) + n_neg for c in batch.chunks)
                     * cfg["num_iterations"])
    mc = r.model.config
    res = dict(name=name, runs=runs, refresh_ms=refresh, tokens=statistics.median(tokens),
               gen_tokens=statistics.median(gen_tokens), items=statistics.median(items),
               n_params=sum(p.numel() for p in r.model.parameters()), num_items=ds.num_items,
               arch=f"{mc.num_hidden_layers} layers x {mc.hidden_size} hidden, {mc.num_attention_heads} heads, "
                    f"vocab {mc.vocab_size}")
    del r, opt, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def table(results):
    """Markdown: per config, median ms per phase, % of the median step, throughput."""
    lines = ["| config | phase | ms (median) | % of step | throughput |", "|---|---|---|---|---|"]
    for res in results:
        med = lambda k: statistics.median(r.get(k, 0.0) for r in res["runs"])  # noqa: E731
        step, n = med("step"), res["name"]
        rate = lambda count, ph, unit: f"{count / med(ph) * 1e3:,.0f} {unit}" if med(ph) else "-"  # noqa: E731
        thr = {"rollout": rate(res["gen_tokens"], "rollout", "generated tok/s"),
               "item encoding": rate(res["items"], "item encoding", "items/s"),
               "forward (tokens)": rate(res["tokens"], "forward (tokens)", "tok/s"),
               "backward": rate(res["tokens"], "backward", "tok/s")}
        for ph in [p for p, _ in PHASES] + ["other"]:
            lines.append(f"| {n} | {ph} | {med(ph):.1f} | {100 * med(ph) / step:.1f}% | {thr.get(ph, '')} |")
        lines.append(f"| {n} | **step** | **{step:.1f}** | 100% | {res['tokens'] / step * 1e3:,.0f} tok/s "
                     "(train.py's tokens_per_s) |")
        every = res["cfg"]["item_refresh"]
        lines.append(f"| {n} | table refresh (every {every} steps, not in step) | {res['refresh_ms']:.1f} | "
                     f"{100 * res['refresh_ms'] / every / step:.1f}% amortized | "
                     f"{res['num_items'] / res['refresh_ms'] * 1e3:,.0f} items/s |")
    return "\n".join(lines)


def run(args):
    import data    # here, not at the top: --help and flag errors answer without loading the model stack
    import train
    t_start, results = time.time(), []
    for name in args.configs:
        cfg, flags = train_config(train, args, name)
        res = time_config(train, name, cfg, data.load_for_run(cfg), args.steps)
        results.append({**res, "cfg": cfg, "flags": flags})
    dev, date = results[0]["cfg"]["device"], datetime.date.today().isoformat()
    cuda, name = dev.startswith("cuda"), machine(dev)
    head = [f"# End-to-end RecPO step: {name} ({dev}), {date}", "",
            f"versions: {json.dumps(versions())}; torch threads: {torch.get_num_threads()}", "",
            f"command: `python bench/step.py {' '.join(args.argv)}`", "",
            f"dataset {args.dataset}; train.py's rollout + update (its loop body; the same code train.py runs), 1 warm-up "
            f"step then {args.steps} timed step(s), median per phase; each phase is timed by common.Phases"
            f"{' (torch.cuda.synchronize at both ends)' if cuda else ''}, as train.py logs it. 'other' = step minus the "
            "phases (prompt building, trimming, table write-back, Python). Throughput: tokens = prompt + completion "
            "tokens of the batch (x --num-iterations).", ""]
    for res in results:
        c = res["cfg"]
        head.append(f"- **{res['name']}**: {res['arch']}, {res['n_params'] / 1e6:.2f} M params; flags "
                    f"`{res['flags'] or '(train.py defaults)'}`; batch {c['batch_size']} users x G="
                    f"{c['num_generations']}, micro-batch {c['micro_batch_size']}, max-new-tokens "
                    f"{c['max_new_tokens']}, prompt-history {c['prompt_history']}, item-loss {c['item_loss']}, "
                    f"kernels {c['kernels']}; per step {res['tokens']:,.0f} tokens ({res['gen_tokens']:,.0f} "
                    f"generated), {res['items']:,.0f} items encoded with grad")
    head += ["", "Phases:"] + [f"- {ph}: {desc}" for ph, desc in PHASES] + [
        "- table refresh: full no-grad re-encode of all items (model.R2ec.refresh_items), run before the first step, "
        "every --item-refresh steps and before each evaluation; timed once, after train.build's own refresh and "
        "before the warm-up step, outside the step", "",
        f"total wall time: {time.time() - t_start:.0f} s; {loadavg()}", "", ""]
    md = table(results)
    slug = common.slug(name.lower())
    path = save_results(args.results_dir, args.out, f"{slug if cuda else 'cpu-' + slug}-e2e-{date}.md",
                        "\n".join(head) + md + "\n")
    return dict(results=results, path=path, table=md)


def configs_arg(text):
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(n not in CONFIGS for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(CONFIGS)}")
    return names


def get_parser():
    p = common.CLIParser(prog="bench/step.py", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--dataset", default="synthetic", help="train.py --dataset (synthetic | synthetic:UxI | ml-100k | ...)")
    a("--steps", type=common.pos_int, default=3, help="timed steps per config, after 1 warm-up step")
    a("--device", default="auto", help="train.py --device (auto | cpu | cuda[:i])")
    a("--configs", type=configs_arg, default="tiny,large", help="comma list: tiny (train.py's defaults + "
      "--train-args) and/or large (+ --large-args)")
    a("--large-args", help=f"train.py flags of the large config, written with '=' [CPU: '{LARGE['cpu']}'; "
      f"CUDA: '{LARGE['cuda']}']")
    a("--train-args", default="", help="extra train.py flags for every config, written with '=': "
      "--train-args='--batch-size 8 --max-new-tokens 16'")
    a("--threads", type=common.nonneg_int, default=0, help="torch CPU threads (0 = torch's default); on a busy "
      "shared CPU, 1 keeps threads from waiting on each other in the many small ops of a tiny model")
    a("--results-dir", default=RESULTS, help="where the results .md goes")
    a("--out", help="also copy the results file into this dir")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)   # recorded in the results file
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return common.run_cli(run, args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
