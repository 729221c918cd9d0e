"""Token log-probs through the LM head (SPEC §6). API stub: reference path only for now.

z = hidden @ W.T / temperature;  logp[t] = z[t, y_t] - logsumexp(z[t]);  entropy[t] = -sum p log p.
"""
import torch

from . import pick_impl


def token_logprobs_reference(hidden, weight, tokens, temperature=1.0, mask=None, return_entropy=False):
    z = (hidden.float() @ weight.float().T) / temperature                     # [T, V]
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, tokens.long()[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    if mask is not None:
        logp, ent = logp * mask, ent * mask
    return (logp, ent) if return_entropy else logp


def token_logprobs(hidden, weight, tokens, temperature=1.0, mask=None, return_entropy=False, impl="auto"):
    pick_impl(impl, hidden, weight)
    return token_logprobs_reference(hidden, weight, tokens, temperature, mask, return_entropy)
