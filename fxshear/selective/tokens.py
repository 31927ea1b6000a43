"""Which tokens a drop site keeps: the CLS token's attention, and the keep/fuse step (EViT).

Why the CLS row is computed here and not read from the attention: fxshear's attention rewrite
keeps no probability matrix and SDPA never forms one.  The ranking needs one row per head,
``softmax(q_cls · Kᵀ · scale)``: O(N) work and memory from the CLS query and the keys (which
Inductor's CSE shares with the attention's own key projection when both are in one graph).
"""

from __future__ import annotations

import math

import torch


def key_valid(mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """``[B, N]`` bool, True for real (non-padding) tokens, from any mask form a Hugging Face
    block receives (None, a ``[B, N]`` 0/1 mask, or a 4-D boolean or additive mask)."""
    if mask is None:
        return None
    if mask.dim() == 4:
        mask = mask[:, 0, 0, :] if mask.shape[-1] == tokens else mask[:, 0, :, 0]
    if mask.dtype == torch.bool:
        return mask
    if mask.dim() == 2 and mask.dtype in (torch.int64, torch.int32, torch.uint8):
        return mask != 0
    return mask > torch.finfo(mask.dtype).min / 2  # additive: 0 attends, the dtype's min does not


def mask_like(original: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor | None:
    """A mask of the original's form and dtype for the kept tokens' ``valid``.  A 4-D mask comes
    back as ``[B, 1, 1, N]`` (it broadcasts over heads and queries), not the ``[B, 1, N, N]``
    square some models build: N times fewer bytes for the trained blocks' attention to keep."""
    if original is None or valid is None:
        return original
    if original.dim() == 2:
        return valid.to(original.dtype)
    shaped = valid[:, None, None, :]
    if original.dtype == torch.bool:
        return shaped
    zero = torch.zeros((), dtype=original.dtype, device=original.device)
    low = torch.full((), torch.finfo(original.dtype).min, dtype=original.dtype, device=original.device)
    return torch.where(shaped, zero, low)


def cls_attention(query: torch.nn.Module, key: torch.nn.Module, x: torch.Tensor, heads: int,
                  valid: torch.Tensor | None, summary: int) -> torch.Tensor:
    """``attn[:, :, 0, summary:].mean(1)``: the CLS token's attention to every other non-summary
    token, averaged over heads, ``[B, N - summary]``; padding keys get none."""
    batch, tokens, _ = x.shape
    q = query(x[:, :1]).view(batch, heads, -1)                    # [B, H, d]
    k = key(x).view(batch, tokens, heads, -1)                     # [B, N, H, d]
    scores = torch.einsum("bhd,bnhd->bhn", q, k) / math.sqrt(q.shape[-1])
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return scores.float().softmax(dim=-1).to(x.dtype)[:, :, summary:].mean(dim=1)


def kept_count(keep_rate: float, tokens: int, summary: int) -> int:
    """``ceil(keep_rate · (N − summary))``: static for a static sequence length; at least one
    for any ``keep_rate`` in (0, 1] once there is a token besides the summary ones."""
    return math.ceil(keep_rate * (tokens - summary))


def keep_tokens(h: torch.Tensor, attn: torch.Tensor, keep: int, fuse: bool, summary: int,
                valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summary tokens, the ``keep`` most attended others (most attended first) and, with
    ``fuse``, one token that is the attention-weighted sum of the dropped ones; and the kept
    tokens' validity (the fused token is real if any dropped token was)."""
    body = h[:, summary:]
    # padding ranks below every real token even where a real token's attention underflows to 0
    rank = attn if valid is None else torch.where(valid[:, summary:], attn, -1.0)
    index = rank.topk(keep, dim=1).indices                        # [B, keep]
    dim = h.shape[-1]
    parts = [h[:, :summary], body.gather(1, index[..., None].expand(-1, -1, dim))]
    dropped = torch.ones_like(attn, dtype=torch.bool).scatter(1, index, False)
    if fuse:
        weights = attn * dropped
        parts.append((weights[..., None] * body).sum(dim=1, keepdim=True))
    if valid is None:
        return torch.cat(parts, dim=1), None
    kept_valid = [valid[:, :summary], valid[:, summary:].gather(1, index)]
    if fuse:
        kept_valid.append((valid[:, summary:] & dropped).any(dim=1, keepdim=True))
    return torch.cat(parts, dim=1), torch.cat(kept_valid, dim=1)
