"""The dual-head R²ec model (SPEC §2-§3): one causal LM, two heads, no new parameters.

- LM head: the backbone's own token head writes the reasoning.
- Item head: h = final-layer hidden state (after the final norm) at the LAST token, L2-normalised.
  Items: h_v at the end of the item prompt (assistant turn pre-filled with the anchor "<answer>").
  Users: h_T at the end of [user prompt + reasoning + anchor]. Score s(v) = cos(h_T, h_v) / tau.

Public API (train.py / eval.py build on exactly this):

    build_backbone(init_from, dataset, tiny_cfg=None, cache_dir=None, dtype=None, device="cpu",
                   verbose=True) -> (hf_model, tokenizer)
        init_from: "tiny" (Qwen2 config built here + BPE tokenizer trained on the dataset's text,
        cached in cache_dir), a local Hugging Face directory, or a local .gguf file. Never downloads.
    format_dt(seconds) -> str                      "3d 4.0h" | "5h 12.0min" | "7.5min"
    R2ec(model, tokenizer, dataset=None, tau=0.02, max_prompt_len=None, impl="auto")
      .item_prompt_ids(ids) -> list[list[int]]
      .encode_items(ids, grad=False, batch_size=64, progress=False) -> h_v [n, d] fp32, L2-normalised
      .refresh_items(batch_size=64, verbose=True)   re-encodes .table (ItemTable, .E [N+1, d] fp32)
      .user_prompt_ids(hist [B,H], hist_rating [B,H], hist_time [B,H], target_time [B]) -> list[list[int]]
      .split_prompt_ids(split, idx) -> list[list[int]]     (same, for samples idx of a data.Split)
      .generate(prompt_ids, G=1, temperature=1.0, top_k=0, top_p=1.0, greedy=False,
                max_new_tokens=640, seed=0) -> rollout dict (below), rows b*G..b*G+G-1 = prompt b
      .no_reasoning(prompt_ids, G=1) -> rollout dict with the anchor right after the prompt
      .forward_both(input_ids, attention_mask, completion_mask, temperature=1.0, return_entropy=False)
          -> (logp [B,L] fp32, h_T [B,d] fp32 L2-normalised, entropy [B,L] fp32 or None)
      .encode_users(prompt_ids, reasoning=True, max_new_tokens=640, batch_size=None) -> h_T [B,d]
          (greedy reasoning + anchor, no grad; the caller sets model.eval())
      .scores(h_T) -> [B, N+1] = h_T . E / tau (column 0 = -inf)
      .decode_completions(rollout) -> list[str]
    rollout dict: input_ids [N,L] int64 (prompt LEFT-padded | completion RIGHT-padded),
      attention_mask [N,L] int64, completion_mask [N,L] bool (reasoning + anchor tokens),
      sampled_mask [N,L] bool (tokens actually sampled; not the appended anchor),
      old_logp [N,L] fp32 (log-prob of each sampled token under softmax(logits / temperature),
      untruncated by top-k/top-p, i.e. what forward_both returns; 0 elsewhere),
      lengths [N] int64 (completion tokens incl. anchor), cut [N] bool (anchor appended), prompt_len int.
    ItemTable(num_items, dim, device): .E [N+1, d] (row 0 = zeros), .update(ids, vecs), .fresh
    apply_lora(model, r, alpha, dropout, targets=LORA_TARGETS) -> list of trainable params (r=0: all)
    merged_state_dict(model) -> dict; lora_state_dict(model) -> dict; load_lora_state(model, path)
    save_checkpoint(path, r2ec, run_config: dict, extra_state: dict | None = None)
    load_checkpoint(path, device="cpu", dtype=None, dataset=None) -> (R2ec, run_config, extra_state)
        (reads run_config["tau"] and run_config.get("max_prompt_len"); dataset= checks the item map)
    ModelError: user-facing one-line errors (CLIs print "error: ..." and exit 2).

Choices worth knowing: generation samples from logits computed as hidden . W^T (the same function the
one-pass uses; Gemma-2's final logit soft-capping is therefore not applied, consistently in both).
A sequence that emits an end-of-turn token before the anchor is treated like a cut-off one: the EOS is
dropped and the anchor appended. Run `python model.py --dataset ml-100k --users 8` for a quick look.
"""
import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from kernels.logprobs import token_logprobs

ANCHOR = "<answer>"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_DEFAULTS = dict(layers=2, heads=4, kv_heads=2, hidden=128, intermediate=352, vocab=4096,
                     max_position=2048, seed=0)
TOKENIZER_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model",
                   "vocab.txt")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # pad, role start, end of turn
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant: {% endif %}")


class ModelError(Exception):
    """User-facing model error: CLIs print `error: <msg>` and exit 2."""


_warned = set()


def warn_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# prompts (SPEC §2)

def format_dt(seconds):
    """Time before the target: >= 1 day "3d 4.0h", >= 1 hour "5h 12.0min", else "7.5min"."""
    # integer tenths, rounded once, then split: never prints "60.0min" or "24.0h"
    s = max(0, int(seconds))
    m10 = round(s / 6)                                     # tenths of a minute
    if m10 < 600:
        return f"{m10 / 10:.1f}min"
    if m10 < 600 * 24:
        h, r = divmod(m10, 600)
        return f"{h}h {r / 10:.1f}min"
    d, r = divmod(round(s / 360), 240)                     # tenths of an hour
    return f"{d}d {r / 10:.1f}h"


def user_instruction(domain):
    d = domain
    return (f"Analyze in depth and finally recommend next {d['item']} I might {d['verb']} inside "
            f"<answer> and </answer>.\nFor example, <answer>a {d['item']}</answer>.\n\n"
            f"Below is my historical {d['items']} and ratings (out of 5):\n")


def history_line(dt, title, rating):
    return f"{format_dt(dt)} ago: [{title}] ({float(rating):.1f})"


def item_text(item, domain, item_id=None):
    """The item prompt's user turn; lines with no data are omitted, description cut to 100 words."""
    title = (item.get("title") or "").strip()
    if not title:
        raise ModelError(f"item {item_id} (raw id {item.get('raw_id')!r}) has an empty title: "
                         "every item needs a title to be encoded; fix or drop it in the item file")
    lines = [f"Title: {title}"]
    if item.get("average_rating") is not None:
        lines.append(f"User Rating: {float(item['average_rating']):.1f}")
    if item.get("rating_number") is not None:
        lines.append(f"Number of Buyers: {int(item['rating_number'])}")
    desc = " ".join((item.get("description") or "").split()[:100])
    if desc:
        lines.append(f"Description: {desc}")
    return (f"Summarize key attributes of the following {domain['item']} inside <answer> and "
            f"</answer>.\n\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------------
# backbones

def _default_cache_dir(dataset):
    # next to data.py's cache (data/<slug>/); the file name carries a hash of the corpus
    root = os.environ.get("R2EC_DATA_ROOT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    return os.path.join(root, "".join(c if c.isalnum() or c in "._-" else "_" for c in dataset.name))


def _tokenizer_corpus(dataset):
    """Deterministic list of texts: item texts + every prompt template with the dataset's words."""
    d = dataset.domain
    texts = [user_instruction(d), ANCHOR, "user", "assistant", "Title: ", "User Rating: ",
             "Number of Buyers: ", "Description: "]
    texts += [format_dt(s) + " ago: [" for s in (450, 5 * 3600 + 720, 3 * 86400 + 4 * 3600, 40 * 86400)]
    texts += [f"({r / 2:.1f})" for r in range(11)]
    for item in dataset.items[1:]:
        texts.append(item.get("title") or "")
        texts.append(" ".join((item.get("description") or "").split()[:100]))
    return [t for t in texts if t]


def train_tokenizer(dataset, vocab_size=4096, cache_dir=None, verbose=True):
    """Byte-level BPE trained on the dataset's own text; cached as tokenizer-v{k}-{V}-{hash}.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    corpus = _tokenizer_corpus(dataset)
    digest = hashlib.sha1("\x00".join(corpus).encode()).hexdigest()[:10]
    cache_dir = cache_dir or _default_cache_dir(dataset)
    path = os.path.join(cache_dir, f"tokenizer-v{TOKENIZER_VERSION}-{vocab_size}-{digest}.json")
    if os.path.exists(path):
        tok = Tokenizer.from_file(path)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        tok.save(tmp)
        os.replace(tmp, path)   # atomic: a concurrent reader sees the old state or the whole file
        if verbose:
            print(f"[model] trained BPE tokenizer: {tok.get_vocab_size()} tokens -> {path}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def build_backbone(init_from, dataset, tiny_cfg=None, cache_dir=None, dtype=None, device="cpu", verbose=True):
    """-> (hf_model in eval mode on device, tokenizer). See the module docstring for init_from."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM)
    device = torch.device(device)
    if init_from == "tiny":
        if dataset is None:
            raise ModelError("--init-from tiny needs a dataset: its tokenizer is trained on the item text")
        c = {**TINY_DEFAULTS, **(tiny_cfg or {})}
        tok = train_tokenizer(dataset, c["vocab"], cache_dir, verbose)
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                          num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                          num_key_value_heads=c["kv_heads"], max_position_embeddings=c["max_position"],
                          tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        with torch.random.fork_rng(devices=[]):   # seeded init without disturbing the caller's RNG
            torch.manual_seed(c["seed"])
            model = Qwen2ForCausalLM(cfg)
        model = model.to(device=device, dtype=dtype or torch.float32)
    else:
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        kw = dict(local_files_only=True)
        if init_from.endswith(".gguf"):
            if not os.path.isfile(init_from):
                raise ModelError(f"--init-from {init_from}: no such .gguf file")
            try:
                import gguf  # noqa: F401
            except ImportError:
                raise ModelError(f"--init-from {init_from}: reading .gguf files needs the optional "
                                 "'gguf' package (pip install gguf)") from None
            src, kw["gguf_file"] = os.path.dirname(os.path.abspath(init_from)), os.path.basename(init_from)
        elif os.path.isdir(init_from):
            src = init_from
            if not os.path.isfile(os.path.join(src, "config.json")):
                raise ModelError(f"--init-from {src}: no config.json; point it at a Hugging Face model "
                                 "directory (config.json, *.safetensors, tokenizer files)")
        else:
            raise ModelError(f"--init-from {init_from!r}: not 'tiny', an existing directory or a .gguf file "
                             "(models are never downloaded; pass a local path)")
        tok_cls = AutoTokenizer
        if "gguf_file" not in kw:
            if not any(os.path.isfile(os.path.join(src, f)) for f in TOKENIZER_FILES):
                raise ModelError(f"--init-from {src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                                 "copy the model's tokenizer into that directory")
            tc = os.path.join(src, "tokenizer_config.json")
            # a plain tokenizer.json (our tiny one): AutoTokenizer would swap in the model type's own
            # pre-tokenizer (Qwen2Tokenizer), which changes the token ids; load it as saved
            if os.path.isfile(tc) and json.load(open(tc)).get("tokenizer_class") in ("TokenizersBackend",
                                                                                       "PreTrainedTokenizerFast"):
                tok_cls = PreTrainedTokenizerFast
        try:
            tok = tok_cls.from_pretrained(src, **kw)
        except Exception as e:
            raise ModelError(f"--init-from {init_from}: no usable tokenizer there "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        if isinstance(tok, bool) or not hasattr(tok, "apply_chat_template"):
            raise ModelError(f"--init-from {init_from}: no usable tokenizer there")
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw).to(device)
        except Exception as e:
            raise ModelError(f"--init-from {init_from}: could not load the model "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not getattr(tok, "chat_template", None):
        warn_once("template", f"--init-from {init_from}: the tokenizer has no chat template; "
                  "using a plain 'User: ... Assistant: ' template")
        tok.chat_template = PLAIN_TEMPLATE
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        print(f"[model] {init_from}: {type(model).__name__} {n / 1e6:.2f}M params, {model.dtype}, "
              f"vocab {len(tok)}, device {device}")
    return model.eval(), tok


# --------------------------------------------------------------------------------------------------
# LoRA (hand-written): W x + (alpha / r) B A dropout(x), A kaiming, B zeros -> starts as the base model

class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0):
        super().__init__()
        self.base, self.scale = base, alpha / r
        # adapter kept in fp32 even on a bf16 backbone: tiny, and the optimizer needs the precision
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        delta = (self.drop(x).to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T   # [..., out]
        return self.base(x) + (delta * self.scale).to(x.dtype)

    def merged_weight(self):
        w = self.base.weight
        return (w.float() + self.scale * (self.lora_B @ self.lora_A)).to(w.dtype)


def apply_lora(model, r, alpha=128.0, dropout=0.0, targets=LORA_TARGETS):
    """Wrap target nn.Linear layers; freeze everything else. r=0: full fine-tuning (all params)."""
    if r <= 0:
        return [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, mod in list(model.named_modules()):
        for child, sub in list(mod.named_children()):
            if child in targets and isinstance(sub, nn.Linear):
                lora = LoRALinear(sub, r, alpha, dropout)
                setattr(mod, child, lora)
                wrapped += [lora.lora_A, lora.lora_B]
    if not wrapped:
        raise ModelError(f"--lora-r {r}: the model has none of the layers {', '.join(targets)}")
    return wrapped


def merged_state_dict(model):
    """State dict with every LoRA layer folded into its base weight, under the original names."""
    sd, merged = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            merged[name] = mod
    for k, v in model.state_dict().items():
        owner = k.rsplit(".", 2)[0] if ".base." in k else None
        if ".lora_A" in k or ".lora_B" in k:
            continue
        if owner in merged:
            k = k.replace(".base.", ".")
            v = merged[owner].merged_weight().detach() if k.endswith(".weight") else v
        sd[k] = v
    return sd


def lora_state_dict(model):
    return {k: v.detach() for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}


def load_lora_state(model, path):
    from safetensors.torch import load_file
    missing = model.load_state_dict(load_file(path), strict=False)
    if missing.unexpected_keys:
        raise ModelError(f"{path}: LoRA weights do not fit this model ({missing.unexpected_keys[0]} ...)")


# --------------------------------------------------------------------------------------------------
# the model: two heads on one backbone

def last_index(mask):
    """Index of the last real token per row; right for left AND right padding. mask [B,L] -> [B]."""
    L = mask.shape[1]
    return L - 1 - mask.long().flip(-1).argmax(-1)


class ItemTable:
    """E [N+1, d] fp32: row j = h_v of item j, row 0 = zeros (padding, always excluded)."""

    def __init__(self, num_items, dim, device="cpu"):
        self.E = torch.zeros(num_items + 1, dim, device=device)
        self.fresh = False   # True once fully encoded

    def update(self, ids, vecs):
        self.E[torch.as_tensor(ids, device=self.E.device).long()] = vecs.detach().float().to(self.E.device)


def sample_next(logits, temperature=1.0, greedy=False, top_k=0, top_p=1.0, gen=None):
    """One decoding step: logits [N, V] fp32 -> (token [N], its log-prob [N]). The log-prob is taken
    under the full tempered softmax (no top-k / top-p truncation), which is what forward_both recomputes."""
    z = logits / max(temperature, 1e-6)                            # [N, V]
    logp_all = torch.log_softmax(z, -1)
    if greedy:
        tok = z.argmax(-1)
    else:
        if top_k and top_k < z.shape[-1]:
            kth = z.topk(top_k, -1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if top_p < 1.0:   # nucleus: keep the smallest prefix of sorted probs reaching top_p
            zs, zi = z.sort(-1, descending=True)
            cum = zs.softmax(-1).cumsum(-1)
            drop = (cum - zs.softmax(-1)) >= top_p
            z = z.masked_fill(torch.zeros_like(drop).scatter(1, zi, drop), float("-inf"))
        tok = torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(1)
    return tok, logp_all.gather(1, tok[:, None]).squeeze(1)


class R2ec:
    def __init__(self, model, tokenizer, dataset=None, tau=0.02, max_prompt_len=None, impl="auto"):
        self.model, self.tok, self.dataset, self.tau, self.impl = model, tokenizer, dataset, tau, impl
        self.backbone = model.base_model   # decoder without the LM head: hidden states only
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ctx = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_prompt_len = max_prompt_len or min(1024, max(ctx - 656, ctx // 2))   # room for 640 new tokens
        self.anchor_ids = tokenizer(ANCHOR, add_special_tokens=False)["input_ids"]
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.stop_ids = {int(e) for e in eos if e is not None}
        self._cache_kw = "cache" if "cache" in inspect.signature(self.backbone.forward).parameters \
            else "past_key_values"   # transformers >= 5.2x renamed the argument
        self._item_ids, self._closes = {}, None
        self.item_map = None   # [(raw_id, title)] for ids 1..N when loaded from a checkpoint
        self.table = ItemTable(dataset.num_items, model.config.hidden_size, self.device) if dataset else None

    @property
    def device(self):
        return self.lm_weight.device

    @property
    def lm_weight(self):
        return self.model.get_output_embeddings().weight   # [V, d]; tied to the input embeddings

    def _hidden(self, ids, mask, pos, cache=None):
        kw = {self._cache_kw: cache, "use_cache": cache is not None} if cache is not None else {"use_cache": False}
        return self.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).last_hidden_state

    def _pad_left(self, seqs):
        P = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), P, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def chat(self, user_text):
        return self.tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                            add_generation_prompt=True)

    def _encode(self, texts):
        return self.tok(texts, add_special_tokens=False)["input_ids"]   # templates carry their own BOS

    # ---- item head ----
    def item_prompt_ids(self, ids):
        todo = [int(i) for i in ids if int(i) not in self._item_ids]
        if todo:
            if self.dataset is None:
                raise ModelError("encoding items needs the dataset (item text); pass dataset=")
            texts = [self.chat(item_text(self.dataset.items[i], self.dataset.domain, i)) + ANCHOR for i in todo]
            for i, t in zip(todo, self._encode(texts)):
                self._item_ids[i] = t
        return [self._item_ids[int(i)] for i in ids]

    def encode_items(self, ids, grad=False, batch_size=64, progress=False, desc="encode items"):
        """-> h_v [n, d] fp32, L2-normalised, in the order of ids. Batches hold items of similar length
        (sorted, longest first) to cut padding; left padding + position ids keep results batch-free."""
        prompts = self.item_prompt_ids(ids)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        chunks = []
        with torch.enable_grad() if grad else torch.no_grad():
            for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
                x, m = self._pad_left([prompts[i] for i in order[s:s + batch_size]])
                h = self._hidden(x, m, (m.cumsum(-1) - 1).clamp(min=0))[:, -1]          # [b, d]
                chunks.append(F.normalize(h.float(), dim=-1))
        inv = torch.empty(len(order), dtype=torch.long)
        inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return torch.cat(chunks)[inv.to(self.device)]

    def refresh_items(self, batch_size=64, verbose=True):
        """Full re-encode of the item table without gradient (eval mode, restored afterwards)."""
        was = self.model.training
        self.model.eval()
        ids = np.arange(1, self.dataset.num_items + 1)
        self.table.E[1:] = self.encode_items(ids, False, batch_size, verbose, "encode item table")
        self.table.fresh = True
        self.model.train(was)

    def scores(self, h_T):
        s = (h_T.float() @ self.table.E.T) / self.tau          # [B, N+1]
        s[:, 0] = float("-inf")
        return s

    # ---- user prompts ----
    def user_prompt_ids(self, hist, hist_rating, hist_time, target_time):
        """Token ids of the chat-rendered user prompts; drops the OLDEST history lines of prompts
        longer than max_prompt_len (the instruction is never cut; the anchor comes after)."""
        d, titles = self.dataset.domain, self.dataset.titles
        head = user_instruction(d)
        out, n_trunc, n_lines = [], 0, 0
        for b in range(len(hist)):
            lines = [history_line(target_time[b] - t, titles[int(i)], r)
                     for i, r, t in zip(hist[b], hist_rating[b], hist_time[b]) if int(i) != 0]
            ids = self._encode(self.chat(head + "\n".join(lines)))
            dropped = 0
            while len(ids) > self.max_prompt_len:
                if not lines:
                    raise ModelError(f"the instruction alone ({len(ids)} tokens) exceeds the max prompt length "
                                     f"{self.max_prompt_len}; raise --max-prompt-len")
                lines, dropped = lines[1:], dropped + 1
                ids = self._encode(self.chat(head + "\n".join(lines)))
            n_trunc, n_lines = n_trunc + (dropped > 0), n_lines + dropped
            out.append(ids)
        if n_trunc:
            warn_once("truncate", f"{n_trunc} of {len(hist)} user prompts exceed {self.max_prompt_len} tokens: "
                      f"dropped their {n_lines} oldest history lines (shown once; raise --max-prompt-len)")
        return out

    def split_prompt_ids(self, split, idx):
        idx = np.asarray(idx)
        return self.user_prompt_ids(split.hist[idx], split.hist_rating[idx], split.hist_time[idx], split.time[idx])

    # ---- LM head: reasoning ----
    def _logits(self, h):
        return F.linear(h, self.lm_weight).float()   # the same function forward_both's log-probs use

    def _closes_anchor(self):
        """Bool [V]: tokens whose text holds the anchor's last char; only then is the tail decoded."""
        if self._closes is None:
            V = self.lm_weight.shape[0]
            texts = self.tok.batch_decode([[i] for i in range(min(V, len(self.tok)))])
            self._closes = [ANCHOR[-1] in t for t in texts] + [False] * max(0, V - len(self.tok))
        return self._closes

    def _assemble(self, prompts, comps, lps, n_sampled, cut):
        """Lists -> rollout dict: [prompt LEFT-padded to P | completion RIGHT-padded to C]."""
        ids, mask = self._pad_left(prompts)
        N, P, C = len(prompts), ids.shape[1], max(len(c) for c in comps)
        tail = torch.full((N, C), self.pad_id, dtype=torch.long)
        cm = torch.zeros(N, C, dtype=torch.bool)
        sm = torch.zeros(N, C, dtype=torch.bool)
        lp = torch.zeros(N, C)
        for i, c in enumerate(comps):
            tail[i, :len(c)] = torch.tensor(c, dtype=torch.long)
            cm[i, :len(c)] = True
            sm[i, :n_sampled[i]] = True
            lp[i, :n_sampled[i]] = torch.tensor(lps[i][:n_sampled[i]])
        z = torch.zeros(N, P, dtype=torch.bool)
        dev = self.device
        return dict(input_ids=torch.cat([ids, tail.to(dev)], 1), attention_mask=torch.cat([mask, cm.long().to(dev)], 1),
                    completion_mask=torch.cat([z, cm], 1).to(dev), sampled_mask=torch.cat([z, sm], 1).to(dev),
                    old_logp=torch.cat([z.float(), lp], 1).to(dev),
                    lengths=torch.tensor([len(c) for c in comps], device=dev),
                    cut=torch.tensor(cut, device=dev), prompt_len=P)

    def no_reasoning(self, prompt_ids, G=1):
        prompts = [p for p in prompt_ids for _ in range(G)]
        comps = [list(self.anchor_ids) for _ in prompts]
        return self._assemble(prompts, comps, [[]] * len(prompts), [0] * len(prompts), [False] * len(prompts))

    @torch.no_grad()
    def generate(self, prompt_ids, G=1, temperature=1.0, top_k=0, top_p=1.0, greedy=False, max_new_tokens=640,
                 seed=0):
        """Sample G reasoning chains per prompt (batched, left padding, KV cache) until each has written
        the anchor; chains cut off at max_new_tokens (or ending their turn first) get the anchor appended."""
        from transformers import DynamicCache
        prompts = [p for p in prompt_ids for _ in range(G)]       # group members adjacent
        N = len(prompts)
        ids, mask = self._pad_left(prompts)                        # [N, P]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)                   # real tokens at 0.. whatever the padding
        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:
            cache = DynamicCache()
        h = self._hidden(ids, mask, pos, cache)[:, -1]             # [N, d]
        next_pos = pos[:, -1:] + 1                                 # [N, 1]
        closes, tail = self._closes_anchor(), len(ANCHOR) + 2
        gen = torch.Generator(device=self.device).manual_seed(seed)
        comps, lps = [[] for _ in range(N)], [[] for _ in range(N)]
        done, hit = [False] * N, [False] * N
        for _ in range(max_new_tokens):
            tok, lp = sample_next(self._logits(h), temperature, greedy, top_k, top_p, gen)   # [N], [N]
            for i, (t, l) in enumerate(zip(tok.tolist(), lp.tolist())):
                if done[i]:
                    continue
                if t in self.stop_ids:
                    done[i] = True     # ended its turn before the anchor: dropped, anchor appended below
                    continue
                comps[i].append(t)
                lps[i].append(l)
                # the anchor spans several tokens: check the decoded tail when a token could close it
                if closes[t] and ANCHOR in self.tok.decode(comps[i][-tail:]):
                    done[i] = hit[i] = True
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones(N, 1)], 1)
            h = self._hidden(tok[:, None], mask, next_pos, cache)[:, -1]
            next_pos = next_pos + 1
        n_sampled = [len(c) for c in comps]
        for i in range(N):
            if not hit[i]:
                comps[i] = comps[i] + list(self.anchor_ids)
        return self._assemble(prompts, comps, lps, n_sampled, [not x for x in hit])

    def decode_completions(self, r):
        P = r["prompt_len"]
        return [self.tok.decode(row[P:P + int(n)].tolist()) for row, n in zip(r["input_ids"], r["lengths"])]

    # ---- one pass for both heads ----
    def forward_both(self, input_ids, attention_mask, completion_mask, temperature=1.0, return_entropy=False):
        """One backbone pass -> (logp [B,L] of completion tokens at temperature, 0 elsewhere; h_T [B,d]
        L2-normalised at the last real token; entropy [B,L] or None). No [B,L,V] logits: log-probs come
        from the hidden states and the LM head weight through kernels.logprobs.token_logprobs."""
        B, L = input_ids.shape
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hid = self._hidden(input_ids, attention_mask, pos)                          # [B, L, d]
        h_T = F.normalize(hid[torch.arange(B, device=hid.device), last_index(attention_mask)].float(), dim=-1)
        m = completion_mask[:, 1:].bool()                          # token t is predicted by hidden t-1
        if m.any():
            out = token_logprobs(hid[:, :-1][m], self.lm_weight, input_ids[:, 1:][m], temperature,
                                 return_entropy=return_entropy, impl=self.impl)    # [T]
        else:   # nothing to score (e.g. prompts only): skip the kernel
            out = (hid.new_zeros(0), hid.new_zeros(0)) if return_entropy else hid.new_zeros(0)
        lp, ent = out if return_entropy else (out, None)
        full = torch.cat([torch.zeros_like(m[:, :1]), m], 1)                        # [B, L]
        logp = torch.zeros(B, L, device=hid.device).masked_scatter(full, lp.float())
        if ent is not None:
            ent = torch.zeros(B, L, device=hid.device).masked_scatter(full, ent.float())
        return logp, h_T, ent

    @torch.no_grad()
    def encode_users(self, prompt_ids, reasoning=True, max_new_tokens=640, batch_size=None):
        """Evaluation: greedy reasoning + anchor, then h_T [B, d]."""
        out, bs = [], batch_size or len(prompt_ids)
        for s in range(0, len(prompt_ids), bs):
            p = prompt_ids[s:s + bs]
            r = self.generate(p, greedy=True, max_new_tokens=max_new_tokens) if reasoning else self.no_reasoning(p)
            out.append(self.forward_both(r["input_ids"], r["attention_mask"], r["completion_mask"])[1])
        return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# checkpoints: one directory, written atomically

def save_checkpoint(path, r2ec, run_config, extra_state=None):
    """Weights (LoRA merged, safetensors), tokenizer, config, run_config.json, item_map.json,
    item_table.safetensors, adapter.safetensors (LoRA, for resuming), train_state.pt (extra_state)."""
    from safetensors.torch import save_file
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    r2ec.model.save_pretrained(tmp, state_dict=merged_state_dict(r2ec.model))
    r2ec.tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "run_config.json"), "w") as f:
        json.dump(run_config, f, indent=1, default=str)
    ds = r2ec.dataset
    if ds is not None:
        items = [{"id": i, "raw_id": ds.items[i].get("raw_id"), "title": ds.titles[i]} for i in range(1, ds.num_items + 1)]
    else:
        items = [{"id": i + 1, "raw_id": r, "title": t} for i, (r, t) in enumerate(r2ec.item_map or [])]
    with open(os.path.join(tmp, "item_map.json"), "w") as f:
        json.dump({"dataset": getattr(ds, "name", None), "num_items": len(items), "items": items}, f)
    if r2ec.table is not None:
        save_file({"E": r2ec.table.E.detach().cpu().contiguous()}, os.path.join(tmp, "item_table.safetensors"))
    lora = lora_state_dict(r2ec.model)
    if lora:
        save_file({k: v.cpu().contiguous() for k, v in lora.items()}, os.path.join(tmp, "adapter.safetensors"))
    if extra_state is not None:
        torch.save(extra_state, os.path.join(tmp, "train_state.pt"))
    old = f"{path}.old-{os.getpid()}"
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path, device="cpu", dtype=None, dataset=None):
    """-> (R2ec with the saved item table, run_config dict, extra_state dict or None)."""
    from safetensors.torch import load_file
    if not os.path.isfile(os.path.join(path, "run_config.json")):
        raise ModelError(f"--ckpt {path}: not a checkpoint directory (no run_config.json)")
    with open(os.path.join(path, "run_config.json")) as f:
        run_config = json.load(f)
    with open(os.path.join(path, "item_map.json")) as f:
        imap = json.load(f)
    if dataset is not None:
        raw = [it["raw_id"] for it in imap["items"]]
        if dataset.num_items != imap["num_items"] or raw != [dataset.items[i].get("raw_id") for i in range(1, dataset.num_items + 1)]:
            raise ModelError(f"--ckpt {path}: its item map ({imap['num_items']} items of {imap['dataset']}) "
                             f"differs from dataset {dataset.name} ({dataset.num_items} items)")
    model, tok = build_backbone(path, None, dtype=dtype or (torch.float32 if torch.device(device).type == "cpu"
                                                            else None), device=device, verbose=False)
    r = R2ec(model, tok, dataset, tau=run_config.get("tau", 0.02), max_prompt_len=run_config.get("max_prompt_len"))
    r.item_map = [(it["raw_id"], it["title"]) for it in imap["items"]]
    tpath = os.path.join(path, "item_table.safetensors")
    if os.path.isfile(tpath):
        E = load_file(tpath)["E"].to(r.device)
        r.table = ItemTable(E.shape[0] - 1, E.shape[1], r.device)
        r.table.E.copy_(E)
        r.table.fresh = True
    spath = os.path.join(path, "train_state.pt")
    extra = torch.load(spath, map_location="cpu", weights_only=False) if os.path.isfile(spath) else None
    return r, run_config, extra


# --------------------------------------------------------------------------------------------------
# CLI: encode the item table and generate reasoning for a few users

def main(argv=None):
    p = argparse.ArgumentParser(description="Quick look at the R2ec model: item table + reasoning for a few users.")
    p.add_argument("--dataset", default="ml-100k", help="dataset name as data.py understands it")
    p.add_argument("--data-dir", default=None, help="where the raw data lives (data.py default if unset)")
    p.add_argument("--init-from", default="tiny", help="'tiny', a local Hugging Face directory or a .gguf file")
    p.add_argument("--split", default="valid", help="which split's samples to reason about")
    p.add_argument("--users", type=int, default=8, help="number of samples (users) to generate for")
    p.add_argument("--max-new-tokens", type=int, default=128, help="reasoning token limit")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling (0 = off)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--batch-size", type=int, default=64, help="item encoding batch size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tau", type=float, default=0.02, help="cosine temperature of the item head")
    args = p.parse_args(argv)
    import data
    try:
        ds = data.load_dataset(args.dataset, data_dir=args.data_dir)
        model, tok = build_backbone(args.init_from, ds, device=args.device)
        r = R2ec(model, tok, ds, tau=args.tau)
        t0 = time.time()
        r.refresh_items(args.batch_size)
        t1 = time.time()
        print(f"[model] item table: {ds.num_items} items x {r.table.E.shape[1]} dims in {t1 - t0:.1f}s")
        split = ds.split(args.split)
        idx = np.arange(min(args.users, len(split)))
        prompts = r.split_prompt_ids(split, idx)
        t2 = time.time()
        ro = r.generate(prompts, temperature=args.temperature, top_k=args.top_k, greedy=args.greedy,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
        t3 = time.time()
        _, h_T, _ = r.forward_both(ro["input_ids"], ro["attention_mask"], ro["completion_mask"])
        top = r.scores(h_T).topk(5, -1).indices
        n_tok = int(ro["lengths"].sum())
        print(f"[model] generated {n_tok} tokens for {len(idx)} users in {t3 - t2:.1f}s "
              f"({n_tok / max(t3 - t2, 1e-9):.0f} tok/s); {int(ro['cut'].sum())} cut off at {args.max_new_tokens}")
        for b, text in enumerate(r.decode_completions(ro)[:2]):
            print(f"--- user {int(split.user[idx[b]])} (prompt {len(prompts[b])} tokens), target "
                  f"[{ds.titles[int(split.target[idx[b]])]}]\n{text}\n"
                  f"top-5: {[ds.titles[int(j)] for j in top[b]]}")
    except (ModelError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
