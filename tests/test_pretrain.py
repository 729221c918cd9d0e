"""The LM stage before RecPO (pretrain.lm_stage, train.py --pretrain-steps): what its corpus holds (train split only:
no valid or test target leaks in), that it learns, and that train.py runs, records and skips it."""
import csv
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import data
import model as M
import train as T
from test_train import SMALL, run, small_model  # noqa: F401 (fixture)
import backbone
import checkpoint
import common
import pretrain


def leaky_world(d):
    """30 users: 8 early interactions each over 20 shared items, then 2 late ones on items of their own whose
    titles are unique strings. The temporal split puts the late ones in valid/test (most of them)."""
    rows, items = [], [(f"c{k}", f"Common film {k} (1990)", "Genres: Drama.") for k in range(20)]
    rng = np.random.default_rng(0)
    for u in range(30):
        for j, k in enumerate(rng.choice(20, 8, replace=False)):
            rows.append((f"u{u}", f"c{k}", 1000 + 100 * j + u))
        for j, s in enumerate("ab"):
            items.append((f"s{u}{s}", f"Qz{u:02d}{s}vault (1999)", f"Genres: Qzgenre{u:02d}{s}."))
            rows.append((f"u{u}", f"s{u}{s}", 10 ** 6 + 1000 * j + u))
    os.makedirs(d, exist_ok=True)
    for name, head, body in (("interactions.csv", ["user", "item", "timestamp"], rows),
                             ("items.csv", ["item", "title", "description"], items)):
        with open(os.path.join(d, name), "w", newline="") as f:
            csv.writer(f).writerows([head] + list(body))
    return f"csv:{d}"


def test_lm_corpus_has_no_valid_or_test_target(tmp_path, monkeypatch):
    """Every LM-stage document of the whole train split, decoded: no title or description of an item that is a
    valid/test target and absent from the train split appears; the train targets' titles do (the check bites)."""
    monkeypatch.setenv("R2EC_DATA_ROOT", str(tmp_path / "data"))   # the world's cache stays out of data/
    ds = data.load_dataset(leaky_world(str(tmp_path / "w")), history=8, verbose=False)
    cfg = T.resolve_config(SMALL + ["--dataset", f"csv:{tmp_path / 'w'}", "--out", str(tmp_path / "o"),
                                    "--item-tokens"])
    r, _, _ = T.build(cfg, ds, verbose=False)
    assert r.item_tokens   # the held items' own tokens must not appear either
    seen = set(ds.train.target.tolist()) | set(ds.train.hist.ravel().tolist())
    held = {int(i) for s in (ds.valid, ds.test) for i in s.target} - seen
    assert len(held) >= 40   # most late items are held-out targets: the test is not vacuous
    docs, plens = pretrain.lm_documents(r, ds.train, np.arange(len(ds.train)), cfg["prompt_history"])
    text = "\n".join(r.tok.decode(d) for d in docs)
    for i in held:
        it = ds.items[i]
        assert it["title"] not in text and it["description"].split()[-1] not in text, it
        assert common.ITEM_TOKEN.format(i) not in text
    for i in set(ds.train.target.tolist()):   # positive control: train targets are what the reasoning learns
        assert f"Next: {common.ITEM_TOKEN.format(i)} {ds.items[i]['title']}" in text
    ends = pretrain.lm_documents(r, ds.train, np.arange(len(ds.train)), cfg["prompt_history"], line_ends=True)[2]
    line_targets = {t for e in ends for _, t in e}   # --pretrain-line-weight's targets: items of train histories
    assert len(line_targets) >= 15 and not line_targets & held
    # each document: its sample's prompt, then the next item's text and the anchor
    k = len(ds.train) - 1
    assert docs[k][:plens[k]] == r.split_prompt_ids(ds.train, [k], cfg["prompt_history"])[0]
    assert r.tok.decode(docs[k][plens[k]:]) == pretrain.next_item_text(r, ds.train.target[k]) + common.ANCHOR
    # the item-token sequences' (pretrain_id_weight): train histories and targets only, in order
    ids, tok = pretrain.id_documents(r, ds.train, np.arange(len(ds.train))), r.item_token_ids()
    assert not {t for d in ids for t in d} & {tok[i] for i in held} and len({t for d in ids for t in d}) >= 15
    assert ids[k] == [tok[i] for i in ds.train.hist[k] if i] + [tok[ds.train.target[k]]]
    names = [common.ITEM_TOKEN.format(i) for i in ds.train.hist[k] if i] + [common.ITEM_TOKEN.format(ds.train.target[k])]
    assert r.tok.decode(ids[k]) == "".join(names)


def test_lm_loss_weights_the_prompt_tokens(tmp_path):
    """--pretrain-prompt-weight p: lm_loss is the mean next-token NLL with the prompt's tokens weighted p and the
    assistant turn's 1, checked against per-token NLLs from each document's own logits (no padding); p = 1 is the
    plain mean over every token, p = 0 the assistant turn alone. stage_forward gives the same loss from its one
    pass, with the prompts' states and h_T (prompt + anchor) equal to each prompt's own forward, also on the
    gradient-checkpointing path."""
    ds = data.load_dataset("synthetic:40x30", history=8, verbose=False)
    cfg = T.resolve_config(SMALL + ["--out", str(tmp_path / "o"), "--kernels", "torch"])
    torch.manual_seed(0)
    r, _, _ = T.build(cfg, ds, verbose=False)
    docs, plens = pretrain.lm_documents(r, ds.train, [3, 17, 29, 30, 41], cfg["prompt_history"])
    assert len({len(d) for d in docs}) > 1   # padding is exercised
    nll, is_prompt = [], []
    with torch.no_grad():
        for d, n in zip(docs, plens):
            ids = torch.tensor([d])
            h = r.hidden(ids, torch.ones_like(ids), torch.arange(len(d))[None])
            nll.append(torch.nn.functional.cross_entropy(r.logits(h)[0, :-1].float(), ids[0, 1:], reduction="none"))
            is_prompt.append(torch.arange(1, len(d)) < n)   # target token j is in the prompt
        nll, is_prompt = torch.cat(nll), torch.cat(is_prompt)
        for p in (0.0, 0.25, 1.0):
            w = torch.where(is_prompt, p, 1.0)
            want = (nll * w).sum() / w.sum()
            torch.testing.assert_close(pretrain.lm_loss(r, docs, plens, prompt_weight=p), want, rtol=1e-5, atol=1e-6)
            loss, H, h_T = pretrain.stage_forward(r, docs, plens, p)
            torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        for i, (d, n) in enumerate(zip(docs, plens)):   # LEFT-padded prompt states; h_T after the bare anchor
            one = d[:n] + list(r.anchor_ids)
            h = r.hidden(torch.tensor([one]), torch.ones(1, len(one), dtype=torch.long), torch.arange(len(one))[None])
            torch.testing.assert_close(H[i, H.shape[1] - n:], h[0, :n], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(h_T[i], torch.nn.functional.normalize(h[0, -1].float(), dim=-1), rtol=1e-4, atol=1e-5)
        base, r.grad_ckpt = pretrain.stage_forward(r, docs, plens, 0.25), True   # training under gradient checkpointing:
        assert r.model.training                                             # the cache-free rows_forward, same results
        for x, y in zip(pretrain.stage_forward(r, docs, plens, 0.25), base):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        r.grad_ckpt = False
        torch.testing.assert_close(pretrain.lm_loss(r, docs), nll.mean(), rtol=1e-5, atol=1e-6)
        assert not torch.isclose(pretrain.lm_loss(r, docs, plens, prompt_weight=0.25), nll.mean())   # the weight bites


def test_lm_stage_learns_the_next_item_text(tmp_path):
    """150 LM steps on the synthetic world lower the next-token loss of unseen train documents well below the
    untrained model's, and greedy reasoning then writes the corpus's form ('... Next: <title>') up to the anchor."""
    cfg = T.resolve_config(SMALL + ["--out", str(tmp_path / "o"), "--pretrain-steps", "150", "--tiny-hidden", "64",
                                   "--kernels", "torch", "--batch-size", "16", "--pretrain-item-weight", "0"])
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    torch.manual_seed(0)
    r, params, _ = T.build(cfg, ds, verbose=False)
    probe = np.arange(len(ds.train))[-16:]   # the stage samples with another seed; these are mostly unseen
    docs, plens = pretrain.lm_documents(r, ds.train, probe, cfg["prompt_history"])
    with torch.no_grad():
        before = pretrain.lm_loss(r, docs, plens).item()
    st = pretrain.lm_stage(r, params, ds.train, T.stage_of(cfg))
    with torch.no_grad():
        after = pretrain.lm_loss(r, docs, plens).item()
    assert st["steps"] == 150 and np.isfinite(st["loss"])
    assert after < 0.6 * before, (before, after)
    r.model.eval()
    ro, _ = r.decode(r.split_prompt_ids(ds.test, np.arange(8), cfg["prompt_history"]), greedy=True,
                     max_new_tokens=40)
    texts = r.decode_completions(ro)
    assert sum(t.endswith(common.ANCHOR) and "Next: " in t for t in texts) >= 6, texts


def test_train_runs_records_and_skips_the_stage(tmp_path, capsys):
    """--pretrain-steps N: the stage runs before RecPO, logs its loss, is kept in the checkpoint's state;
    --pretrain-steps 0 skips it; a resumed run does not run it again.
    Runs too short for RecPO warn that their best checkpoint is barely trained by it (or at all, with no stage)."""
    res, cfg = run(tmp_path, "--pretrain-steps", "6", "--max-steps", "2", "--eval-every", "0", "--kernels", "torch",
                   name="a")
    assert "warning: the best checkpoint is from RecPO step 2 of 2: essentially untrained by RecPO;" in capsys.readouterr().out
    recs = [json.loads(x) for x in open(os.path.join(cfg["out"], "log.jsonl"))]
    st = [x for x in recs if "seconds" in x and "loss" in x]
    assert len(st) == 1 and st[0]["steps"] == 6 and np.isfinite(st[0]["loss"])
    saved = checkpoint.load_train_state(os.path.join(cfg["out"], "last"))
    assert saved["state"]["pretrain"]["steps"] == 6
    res2, cfg2 = run(tmp_path, "--resume", os.path.join(cfg["out"], "last"), "--max-steps", "3", name="a")
    recs2 = [json.loads(x) for x in open(os.path.join(cfg["out"], "log.jsonl"))][len(recs):]
    assert res2["steps"] == 3 and not any("seconds" in x and "loss" in x for x in recs2)
    capsys.readouterr()
    _, cfg0 = run(tmp_path, "--pretrain-steps", "0", "--max-steps", "1", "--eval-every", "0", name="b")
    assert "from RecPO step 1 of 1: essentially untrained; the numbers" in capsys.readouterr().out
    assert not any("lm_step" in x or "loss" in x and "seconds" in x
                   for x in map(json.loads, open(os.path.join(cfg0["out"], "log.jsonl"))))


def test_stage_item_loss_matches_a_reference_and_trains_the_item_head(tmp_path):
    """--pretrain-item-weight w: item_ce is the plain softmax cross-entropy of h_T against the fresh embeddings of
    the distinct targets + negatives, h_T w/o reasoning (prompt + anchor), checked against h_T decoded one prompt at
    a time; after the same LM stage, the item loss of unseen train samples over the whole catalog is lower with it
    than without."""
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    probe = np.arange(len(ds.train))[-64:]
    tgt, neg, after = torch.as_tensor(ds.train.target[probe]), torch.tensor([3, 7, 7, 50, 61]), {}
    for w in ("0", "1"):
        cfg = T.resolve_config(SMALL + ["--out", str(tmp_path / "o"), "--pretrain-steps", "150", "--tiny-hidden",
                                       "64", "--kernels", "torch", "--batch-size", "16", "--pretrain-item-weight", w,
                                       "--item-negatives", "24", "--max-new-tokens", "5"])
        torch.manual_seed(0)
        r, params, _ = T.build(cfg, ds, verbose=False)
        prompts = r.split_prompt_ids(ds.train, probe, cfg["prompt_history"])
        r.model.eval()
        if w == "1":
            with torch.no_grad():
                got = pretrain.item_ce(r, prompts[:16], tgt[:16], neg)[0].item()
                h = torch.stack([r.decode([p], max_new_tokens=0)[1][0] for p in prompts[:16]])   # one at a time
                cand = sorted(set(tgt[:16].tolist()) | set(neg.tolist()))
                e = r.encode_items(cand)
                col = [cand.index(t) for t in tgt[:16].tolist()]
                want = -torch.log_softmax(h @ e.T / r.tau, 1)[torch.arange(16), col].mean()
            assert abs(got - want.item()) < 1e-4, (got, want.item())
        st = pretrain.lm_stage(r, params, ds.train, T.stage_of(cfg))
        r.model.eval()
        with torch.no_grad():
            after[w] = pretrain.item_ce(r, prompts, tgt, torch.arange(1, ds.num_items + 1))[0].item()
        assert st["steps"] == 150 and (w == "0") == ("item_loss" not in st)
    assert after["1"] < after["0"] - 0.05, after


def test_full_catalog_item_ce_is_straight_through(small_model):
    """item_ce over the whole cached table (exclude given): the loss is the softmax cross-entropy over the table's
    VALUES with the history masked (a fresh row is never told apart by being fresher), and each fresh row gets the
    gradient its table row would get: value and every parameter's gradient against a plain autograd reference
    (user path + d loss / d table row pushed through the fresh item encodings), on random table values."""
    r, ds = small_model
    torch.manual_seed(3)
    E0 = r.table.E.clone()
    r.table.E[1:] = torch.nn.functional.normalize(torch.randn(ds.num_items, r.table.E.shape[1]), dim=-1)
    idx = np.arange(len(ds.train))[-7:]
    prompts = r.split_prompt_ids(ds.train, idx, 3)
    tgt, neg, hist = torch.as_tensor(ds.train.target[idx]), torch.tensor([2, 5, 40]), torch.from_numpy(ds.train.hist[idx])
    params = [p for p in r.model.parameters() if p.requires_grad]
    r.model.zero_grad()
    loss, cand, _ = pretrain.item_ce(r, prompts, tgt, neg, hist)
    loss.backward()
    got = [p.grad.clone() for p in params]
    r.model.zero_grad()
    ids, mask = r.pad_left([p + list(r.anchor_ids) for p in prompts])
    h = torch.nn.functional.normalize(r.hidden(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))[:, -1].float(), dim=-1)
    E = r.table.E.clone().requires_grad_(True)
    s = h @ E.T / r.tau
    masked = torch.zeros_like(s, dtype=torch.bool).scatter_(1, hist, True)
    masked[:, 0], masked[torch.arange(7), tgt] = True, False    # padding out; the target never masked
    want = -torch.log_softmax(s.masked_fill(masked, float("-inf")), 1)[torch.arange(7), tgt].mean()
    assert abs(loss.item() - want.item()) < 1e-5, (loss.item(), want.item())
    want.backward()                                              # the user path, and d loss / d E
    (r.encode_items(cand.tolist(), grad=True) * E.grad[cand]).sum().backward()   # the item path, straight through
    for p, g in zip(params, got):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    assert E.grad[cand].abs().sum() > 0 and sum(float(g.abs().sum()) for g in got) > 0
    r.model.zero_grad()
    with torch.no_grad():   # + line rows (--pretrain-line-weight): the same masked softmax over the table's values
        hl, tl, xl = torch.randn(5, h.shape[1]), torch.tensor([4, 9, 9, 30, 77]), hist[[0, 1, 2, 3, 4]]
        both = pretrain.item_ce(r, prompts, tgt, neg, hist, (hl, tl, xl, 0.3))[0].item()
        s = torch.nn.functional.normalize(hl, dim=-1) @ r.table.E.T / r.tau
        ml = torch.zeros_like(s, dtype=torch.bool).scatter_(1, xl, True)
        ml[:, 0], ml[torch.arange(5), tl] = True, False
        line = -torch.log_softmax(s.masked_fill(ml, float("-inf")), 1)[torch.arange(5), tl].mean()
    assert abs(both - (want.item() + 0.3 * line.item())) < 1e-4, (both, want.item(), line.item())
    r.table.E.copy_(E0)


def test_line_ends_mark_each_history_line_and_its_next_item(small_model):
    """user_prompt_ids(line_ends=True): for every history line but the last, the token holding the newline that ends
    it and the item of the line after it, also when --max-prompt-len drops the oldest lines; the ids are unchanged."""
    r, ds = small_model
    idx = np.arange(len(ds.train))[-40:]
    cap, r.max_prompt_len = r.max_prompt_len, int(np.median([len(p) for p in r.split_prompt_ids(ds.train, idx, 8)]))
    try:   # about half the prompts lose their oldest lines
        plain = r.split_prompt_ids(ds.train, idx, 8)
        prompts, ends = r.split_prompt_ids(ds.train, idx, 8, line_ends=True)
    finally:
        r.max_prompt_len = cap
    assert prompts == plain
    n_cut = 0
    for b, (p, e) in enumerate(zip(prompts, ends)):
        hist, text = [int(i) for i in ds.train.hist[idx[b]] if i], r.tok.decode(p)
        kept = sum(f"[{ds.titles[i]}]" in text for i in set(hist))   # the synthetic titles are distinct
        n_cut += kept < len(hist)
        assert len(e) == kept - 1 and [t for _, t in e] == hist[len(hist) - kept + 1:], (e, hist, kept)
        for j, t in e:
            assert r.tok.decode([p[j]]) == "\n"
            assert f"[{ds.titles[t]}]" in r.tok.decode(p[j + 1:]).split("\n")[0]
    assert 5 <= n_cut < 40, n_cut


def test_line_item_loss_matches_states_computed_one_prefix_at_a_time(small_model):
    """stage_loss with --pretrain-line-weight w: its item loss = the anchor form's cross-entropy + w x the
    cross-entropy, over the same fresh candidates, of each line end's state (taken from the LM forward), each
    checked against the state of that prefix of the prompt run alone; w = 0: the anchor form alone."""
    r, ds = small_model
    cfg = T.resolve_config(SMALL + ["--item-negatives", "7", "--prompt-history", "6"])
    s, w = 4, 0.7
    idx = data.train_indices(s, cfg["batch_size"], len(ds.train), cfg["seed"] + 7919)
    neg = np.random.default_rng([cfg["seed"], 7919, s]).choice(ds.num_items, 7, replace=False) + 1
    prompts, ends = r.split_prompt_ids(ds.train, idx, 6, line_ends=True)
    rows = [(b, j, t) for b, e in enumerate(ends) for j, t in e]
    assert len(rows) >= 20
    with torch.no_grad():
        got = {v: pretrain.stage_loss(r, ds.train, T.stage_of({**cfg, "pretrain_line_weight": v}), s)[2].item() for v in (0.0, w)}
        one = lambda ids: r.hidden(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),  # noqa: E731
                                   torch.arange(len(ids))[None])[0, -1]
        h_T = torch.stack([one(p + list(r.anchor_ids)) for p in prompts])
        h_line = torch.stack([one(prompts[b][:j + 1]) for b, j, _ in rows])

        def ce(h, t, cand):
            logp = torch.log_softmax(torch.nn.functional.normalize(h.float(), dim=-1) @ r.encode_items(cand).T / r.tau, 1)
            return -logp[torch.arange(len(t)), [cand.index(int(x)) for x in t]].mean().item()
        tgt = ds.train.target[idx]
        c0 = sorted(set(tgt.tolist()) | set(neg.tolist()))
        c1 = sorted(set(c0) | {t for _, _, t in rows})
        want = {0.0: ce(h_T, tgt, c0), w: ce(h_T, tgt, c1) + w * ce(h_line, [t for _, _, t in rows], c1)}
    for v in (0.0, w):
        assert abs(got[v] - want[v]) < 1e-4, (v, got, want)


def test_item_tokens_name_each_item_by_one_token(tmp_path):
    """--item-tokens: one added token per item, written before its title in the history lines, the item prompt and
    the stage's continuation; the text decodes back exactly; refused for a pretrained LM, off there by default."""
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    cfg = T.resolve_config(SMALL + ["--item-tokens"])
    r, _, _ = T.build(cfg, ds, verbose=False)
    tid = [r.encode_text([common.ITEM_TOKEN.format(i)])[0] for i in range(1, ds.num_items + 1)]
    assert all(len(t) == 1 for t in tid) and len({t[0] for t in tid}) == ds.num_items
    assert r.item_tokens and r.model.config.vocab_size == len(r.tok) >= max(t[0] for t in tid) + 1
    idx = np.arange(len(ds.train))[-20:]
    for b, p in zip(idx, r.split_prompt_ids(ds.train, idx, 8)):
        hist = [int(i) for i in ds.train.hist[b][-8:] if i]
        text = r.tok.decode(p)
        assert [t for t in p if [t] in tid] == [tid[i - 1][0] for i in hist]          # in order, nothing else
        assert all(f" ago: {common.ITEM_TOKEN.format(i)} [{ds.titles[i]}] (" in text for i in hist)
        assert r.encode_text([text])[0] == p
    for i in (1, 37, ds.num_items):
        p = r.item_prompt_ids([i])[0]
        assert [t for t in p if [t] in tid] == tid[i - 1]
        assert f"Title: {common.ITEM_TOKEN.format(i)} {ds.titles[i]}" in r.tok.decode(p)
        assert pretrain.next_item_text(r, i).endswith(f"Next: {common.ITEM_TOKEN.format(i)} {ds.titles[i]}")
    plain = backbone.build_backbone("tiny", ds, {**T.tiny_cfg(cfg), "item_tokens": False}, verbose=False)
    assert not M.R2ec(*plain, ds).item_tokens and len(plain[1]) == len(r.tok) - ds.num_items
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (hf / f).write_text("{}")
    off = T.resolve_config(SMALL + ["--init-from", str(hf)])
    assert off["item_tokens"] is False and off["pretrain_steps"] == 0   # the cpu preset's, off here
    saved = json.loads(json.dumps(off))                                  # as run_config.json; --resume reads it back
    assert T.get_parser().parse_saved(saved, "run_config.json")["item_tokens"] is False
    with pytest.raises(common.ModelError, match="--item-tokens: only the tiny backbone"):
        T.resolve_config(SMALL + ["--init-from", str(hf), "--item-tokens"])


def test_item_token_sequences_add_their_nll_and_teach_the_next_item():
    """pretrain_id_weight (PRESETS): the stage's loss is its text loss + w x the NLL of the step's item-token sequences
    (the same draw for the same step), and training on them lowers that NLL on held-back train samples."""
    ds = data.load_dataset("synthetic:150x80", history=8, verbose=False)
    cfg = T.resolve_config(SMALL + ["--item-tokens"])
    r, params, _ = T.build(cfg, ds, verbose=False)
    st = T.stage_of(cfg)
    assert st.id_weight == 1.0   # the cpu preset's
    torch.manual_seed(0)
    base, _, _ = pretrain.stage_loss(r, ds.train, dataclasses.replace(st, id_weight=0.0), 3)
    torch.manual_seed(0)
    both, _, _ = pretrain.stage_loss(r, ds.train, dataclasses.replace(st, id_weight=0.5), 3)
    j = data.train_indices(3, st.id_batch, len(ds.train), st.seed + 104729)
    want = 0.5 * pretrain.lm_loss(r, pretrain.id_documents(r, ds.train, j))
    assert torch.allclose(both - base, want, rtol=1e-4) and want > 0
    held = pretrain.id_documents(r, ds.train, np.arange(len(ds.train))[-64:])
    with torch.no_grad():
        before = pretrain.lm_loss(r, held).item()
    opt, r.impl = torch.optim.AdamW(params, lr=1e-2), "torch"   # the interpreter's kernels: ~2 s a step
    for s in range(30):   # the sequences' loss alone (the stage adds it to the text loss, as checked above)
        j = data.train_indices(s, st.id_batch, len(ds.train) - 64, st.seed + 104729)
        pretrain.lm_loss(r, pretrain.id_documents(r, ds.train, j)).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = pretrain.lm_loss(r, held).item()
    assert after < before - 1.0, (before, after)


def test_knowledge_stage_documents_read_the_corpus_and_never_write_a_target(tmp_path, monkeypatch):
    """synthetic-knowledge: the corpus is one sentence per item, the same whatever the interactions; the taught
    chain is the corpus's sentence about the prompt's last item, on exactly the train samples where it does not
    name the target; prompts hold train interactions only; the loss reads the corpus (its NLL is in it)."""
    monkeypatch.setenv("R2EC_DATA_ROOT", str(tmp_path / "data"))
    cfg = T.resolve_config(SMALL + ["--dataset", "synthetic-knowledge:200x120", "--out", str(tmp_path / "o"),
                                    "--item-tokens", "--prompt-history", "4"])
    ds = data.load_for_run(cfg, verbose=False)
    r, _, _ = T.build(cfg, ds, verbose=False)
    rel, tag = ds.relation, lambda i: f"{common.ITEM_TOKEN.format(i)} {ds.items[i]['title']}"
    corpus, pool = pretrain.knowledge(r, ds.train, cfg["prompt_history"])
    assert [r.tok.decode(d) for d in corpus] == [
        common.KNOWLEDGE_FACT.format(a=tag(a), b=tag(rel[a])) for a in range(1, ds.num_items + 1)]
    other = data.load_dataset("synthetic-knowledge:90x120", history=cfg["history"], verbose=False)   # same items
    same = {(ds.items[a]["title"], ds.items[rel[a]]["title"]) for a in range(1, ds.num_items + 1)}
    assert {(it["title"], other.items[other.relation[i]]["title"]) for i, it in enumerate(other.items[1:], 1)
            if it["title"] in ds.titles} <= same
    last, target = ds.train.hist[:, -1], ds.train.target
    np.testing.assert_array_equal(pool, np.flatnonzero(rel[last] != target))   # the chain never names it
    assert 0.2 < 1 - len(pool) / len(ds.train) < 0.5   # the relation's train samples: RecPO's to learn from
    docs, plens = pretrain.lm_documents(r, ds.train, pool, cfg["prompt_history"])
    held = {(u, i) for s in (ds.valid, ds.test) for u, i in zip(s.user.tolist(), s.target.tolist())}
    for k, j in enumerate(pool):
        turn = r.tok.decode(docs[k][plens[k]:])
        b = rel[last[j]]
        assert turn == common.KNOWLEDGE_FACT.format(a="Your last movie", b=tag(b)) + common.ANCHOR
        assert common.ITEM_TOKEN.format(target[j]) not in turn
        shown = {int(t) for t in ds.train.hist[j, -4:] if t}
        assert all(common.ITEM_TOKEN.format(i) in r.tok.decode(docs[k][:plens[k]]) for i in shown)
        assert not {(int(ds.train.user[j]), i) for i in shown} & held
    st = dataclasses.replace(T.stage_of(cfg), batch_size=4, item_weight=0.0, id_weight=0.0)
    with torch.no_grad():
        full = pretrain.stage_loss(r, ds.train, st, 0)[0]
        plain = pretrain.stage_loss(r, ds.train, dataclasses.replace(st, corpus_batch=0), 0)[0]
        nll = pretrain.lm_loss(r, [corpus[k] for k in data.train_indices(0, len(corpus), len(corpus), 15485863)])
    assert float(full - plain) == pytest.approx(float(nll), rel=1e-4)


def test_knowledge_preset_is_the_worlds_default_and_prints_sasrec_beside_r2ec(tmp_path, monkeypatch, capsys):
    """On synthetic-knowledge the CPU default is --preset knowledge; it trains popularity and SASRec on the same
    world first when their table is missing (R2ec's budget starts after them), so the test table has both rows;
    the stage reads the corpus and teaches the recall chain."""
    monkeypatch.chdir(tmp_path)   # baselines.py writes out/baselines/ under the working directory
    monkeypatch.setenv("R2EC_DATA_ROOT", str(tmp_path / "data"))
    cfg = T.resolve_config(["--dataset", "synthetic-knowledge:80x40", "--device", "cpu"])
    assert cfg["preset"] == "knowledge" and cfg["time_budget"] == 5.0 and cfg["pretrain_item_weight"] == 0
    assert T.resolve_config(["--dataset", "synthetic:80x40", "--device", "cpu"])["preset"] == "cpu"
    res, cfg = run(tmp_path, "--dataset", "synthetic-knowledge:80x40", "--preset", "knowledge", "--pretrain-steps",
                   "4", "--max-steps", "2", "--eval-every", "0", "--seed", "1", "--max-new-tokens", "24",
                   "--tiny-hidden", "32", "--test-samples", "all")
    out = capsys.readouterr().out
    assert "popularity and SASRec first" in out and "| SASRec |" in res["table"] and "| popularity |" in res["table"]
    assert os.path.isfile(tmp_path / "out" / "baselines" / "synthetic-knowledge-80x40-seed-1.json")
    assert "dataset synthetic-knowledge:80x40 seed=1" in out and "LM stage: 4 steps" in out
    run(tmp_path, "--dataset", "synthetic-knowledge:80x40", "--preset", "knowledge", "--max-steps", "1",
        "--eval-every", "0", "--seed", "1", "--test-samples", "none", name="again")
    assert "SASRec first" not in capsys.readouterr().out   # the table is there: not trained again
