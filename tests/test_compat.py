"""Transformers-version compatibility of the decode KV cache (backbone.new_cache / _roomy_layer).

RoomyLayer builds on transformers' PRIVATE cache_utils.DynamicLayer; _roomy_layer feature-detects it and new_cache
falls back to the plain DynamicCache where it is gone or acts otherwise. These tests run under the pinned
transformers (requirements.txt) and, in .ci/run, again under transformers 5.17.0 (the GPU machine's image):
  - the roomy cache decodes exactly what the plain DynamicCache decodes (tokens, log-probs, h_T), and is in use;
  - with DynamicLayer removed or changed, the fallback is taken and decodes the same;
  - the transformers version is reported, and checked against R2EC_EXPECT_TRANSFORMERS when that is set.
CPU only: the check is about transformers' API, and bitwise equality is asked of CPU kernels only.
"""
import os

import pytest
import torch
import transformers
from transformers import cache_utils

import backbone
import model as M
from test_model import TINY, fake_dataset

DECODE = [dict(G=3, greedy=False, temperature=1.5, top_k=20, max_new_tokens=12, seed=3, greedy_first=True),
          dict(G=1, greedy=True, max_new_tokens=9)]


@pytest.fixture(scope="module")
def r2ec(tmp_path_factory):
    ds = fake_dataset()
    hf, tok = backbone.build_backbone("tiny", ds, TINY, cache_dir=str(tmp_path_factory.mktemp("tok")), verbose=False)
    return M.R2ec(hf, tok, ds, impl="torch")


@pytest.fixture
def fresh_probe():
    """_roomy_layer caches its answer per process: forget it around a test that changes transformers (listed before
    monkeypatch, so that the answer is forgotten again after monkeypatch has undone the change)."""
    backbone._roomy_layer.cache_clear()
    yield
    backbone._roomy_layer.cache_clear()


def decode_all(r):
    prompts = r.split_prompt_ids(r.dataset.valid, [1, 4, 6, 7])
    with torch.no_grad():
        return [r.decode(prompts, **kw) for kw in DECODE]


def layer_types(r):
    return {type(x).__name__ for x in backbone.new_cache(r.model, room=8).layers}


def assert_same(got, want):
    for (a, ha), (b, hb) in zip(got, want):
        for k in ("input_ids", "attention_mask", "completion_mask", "old_logp", "lengths", "cut"):
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(ha, hb), "h_T"


def test_transformers_version_reported():
    """Which transformers this run uses (-rA or the CI log shows it); .ci/run sets the expected version."""
    want = os.environ.get("R2EC_EXPECT_TRANSFORMERS")
    print(f"transformers {transformers.__version__} from {os.path.dirname(transformers.__file__)}")
    if want:
        assert transformers.__version__ == want, (transformers.__version__, transformers.__file__)


def test_roomy_cache_decodes_as_the_plain_cache(r2ec, monkeypatch):
    assert layer_types(r2ec) == {"RoomyLayer"}, (
        f"transformers {transformers.__version__}: _roomy_layer fell back to the plain DynamicCache (correct, "
        f"slower): DynamicLayer changed, adapt backbone._Room")
    roomy = decode_all(r2ec)
    monkeypatch.setattr(backbone, "_roomy_layer", lambda: None)   # new_cache's fallback: the plain DynamicCache
    assert layer_types(r2ec) == {"DynamicLayer"}
    assert_same(roomy, decode_all(r2ec))
    assert all(a["sampled_mask"].any() for a, _ in roomy)   # the chains did decode tokens


class Counting(getattr(cache_utils, "DynamicLayer", object)):   # object: DynamicLayer gone (its case is skipped)
    """A DynamicLayer that acts otherwise: its length is a counter that its own update() advances."""

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.n = 0

    def update(self, key_states, value_states, *args, **kwargs):
        self.n = getattr(self, "n", 0) + key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self):
        return self.n if self.is_initialized else 0


class Bare:
    """What a DynamicLayer without lazy_initialization / is_initialized / keys would look like."""

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


@pytest.mark.parametrize("change", ["missing", "bare", "counting"])
def test_fallback_without_the_private_layer(r2ec, fresh_probe, monkeypatch, change):
    if change == "counting" and Counting.__base__ is object:
        pytest.skip("this transformers has no DynamicLayer")
    want = decode_all(r2ec)   # the roomy cache (checked against the plain one above)
    if change == "missing":
        monkeypatch.delattr(cache_utils, "DynamicLayer")
    else:
        monkeypatch.setattr(cache_utils, "DynamicLayer", {"bare": Bare, "counting": Counting}[change])
    backbone._roomy_layer.cache_clear()
    assert backbone._roomy_layer() is None
    assert layer_types(r2ec) == {"DynamicLayer"}   # DynamicCache's own layers: not replaced
    assert_same(decode_all(r2ec), want)
