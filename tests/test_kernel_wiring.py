"""One RecPO training step of the dual-head model with the fused kernels on and off.

The same rollout, the same weights: forward_both (token log-probs through kernels/logprobs.py) and
the full-catalog item loss (kernels/catalog.py), then backward. With impl="triton" (the interpreter
here, real kernels on CUDA) and impl="torch" the loss and every parameter gradient must agree.
"""
import copy

import pytest
import torch

import model as M
import recpo
from test_model import TINY, fake_dataset
import backbone


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = fake_dataset(n_items=23, n_samples=5, H=4, seed=7)
    cache = str(tmp_path_factory.mktemp("tok"))
    model, tok = backbone.build_backbone("tiny", ds, TINY, cache_dir=cache, verbose=False)
    return ds, model, tok


def one_step(ds, model, tok, impl, device):
    """Loss and gradients of one RecPO update on a fixed rollout of 2 users x G=3 chains."""
    torch.manual_seed(0)
    model = copy.deepcopy(model).to(device).train()
    r = M.R2ec(model, tok, ds, tau=0.05, impl=impl)
    G, idx = 3, [0, 3]
    prompts = r.split_prompt_ids(ds.train, idx)
    with torch.no_grad():
        ro, _ = r.decode(prompts, G=G, greedy=False, temperature=2.0, top_k=50, max_new_tokens=6, seed=1)
        r.refresh_items()
    logp, h_T, ent = r.forward_both(ro, G, temperature=2.0, return_entropy=True)    # [N, C], [N, d]
    targets = torch.as_tensor(ds.train.target[idx], device=device).repeat_interleave(G)   # [N]
    hist = torch.as_tensor(ds.train.hist[idx], device=device).repeat_interleave(G, 0)    # [N, H]
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.9, -1.2], device=device)                 # [N]
    mask = ro["sampled_mask"][:, ro["prompt_len"]:]                                       # [N, C]
    old = ro["old_logp"][:, ro["prompt_len"]:].detach()
    tl, _ = recpo.token_loss(logp, old, adv, mask)
    item_emb = r.encode_items(targets.tolist(), grad=True)                                # [N, d]
    il, _ = recpo.item_loss(h_T, item_emb, targets, adv, None, G, topk=1, tau=0.05, mode="full",
                            E=r.table.E, exclude=hist, impl=impl)
    loss = tl + il - 0.01 * (ent * mask).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, ro


def test_training_step_same_with_kernels_on_and_off(setup, device):
    ds, model, tok = setup
    loss_k, g_k, ro_k = one_step(ds, model, tok, "triton", device)
    loss_t, g_t, ro_t = one_step(ds, model, tok, "torch", device)
    assert torch.equal(ro_k["input_ids"], ro_t["input_ids"])      # same rollout, so a fair comparison
    assert torch.isfinite(loss_k) and abs(loss_k.item()) > 0
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-4, atol=1e-5)
    assert g_k.keys() == g_t.keys() and len(g_k) > 5
    for name in g_k:
        a, b = g_k[name].float(), g_t[name].float()
        rel = (a - b).norm() / b.norm().clamp_min(1e-12)
        assert rel < 1e-3, f"{name}: relative gradient difference {rel:.2e}"
