"""Catalog softmax for the item head (SPEC §6). API stub: reference path only for now.

logits[m, j] = H[m] . E[j] / tau     H [M,d] user states, E [N,d] item table (row j = item id j,
row 0 = padding, always excluded), targets [M], exclude [M,X] int64 (0-padded) per-row ids.
"""
from collections import namedtuple

import torch

from . import pick_impl

CatalogStats = namedtuple("CatalogStats", "lse target_logit rank topk_scores topk_ids")


def _excluded_mask(M, N, exclude, device):
    mask = torch.zeros(M, N, dtype=torch.bool, device=device)
    mask[:, 0] = True
    if exclude is not None and exclude.numel():
        mask.scatter_(1, exclude.long().clamp(0, N - 1), True)
    return mask


def catalog_stats_reference(H, E, targets, exclude=None, tau=1.0, topk=0):
    M, N = H.shape[0], E.shape[0]
    logits = (H.float() @ E.float().T) / tau                                  # [M, N]
    excl = _excluded_mask(M, N, exclude, H.device)
    t = targets.long()
    tgt = logits.gather(1, t[:, None]).squeeze(1)                             # [M]
    t_excl = excl.gather(1, t[:, None]).squeeze(1)
    masked = logits.masked_fill(excl, float("-inf"))
    lse = torch.logsumexp(masked, dim=1)
    beats = (masked >= tgt[:, None]) & ~excl
    beats.scatter_(1, t[:, None], False)
    rank = torch.where(t_excl, torch.full_like(t, N), beats.sum(1))
    ts = ti = None
    if topk:
        ts, ti = masked.topk(min(topk, N), dim=1)
    return CatalogStats(lse, tgt, rank, ts, ti)


def catalog_stats(H, E, targets, exclude=None, tau=1.0, topk=0, impl="auto"):
    pick_impl(impl, H, E)
    with torch.no_grad():
        return catalog_stats_reference(H, E, targets, exclude, tau, topk)


def catalog_loss_reference(H, E, targets, exclude=None, tau=1.0, reduction="mean"):
    M, N = H.shape[0], E.shape[0]
    logits = (H.float() @ E.float().T) / tau
    excl = _excluded_mask(M, N, exclude, H.device)
    excl.scatter_(1, targets.long()[:, None], False)  # the positive is never masked in the loss
    loss = -torch.log_softmax(logits.masked_fill(excl, float("-inf")), 1).gather(1, targets.long()[:, None]).squeeze(1)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def catalog_loss(H, E, targets, exclude=None, tau=1.0, reduction="mean", impl="auto"):
    pick_impl(impl, H, E)
    return catalog_loss_reference(H, E, targets, exclude, tau, reduction)
