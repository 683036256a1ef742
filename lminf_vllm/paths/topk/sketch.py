"""The 8-bit scoring copy of the keys (topk_score "mass_int8"): how keys and queries are rounded.

docs/topk-contract.md, "Mass from 8-bit keys". The mass score reads every middle key per scoring
row; at 8 requests and more that reading is most of a decode step. The host store keeps, beside
each key at position 0 (which the attention reads), its 8-bit copy: per key and KV head a scale
ks = max |u| / 127 and the integers round(u / ks) + 128 in uint8 (the +128 because AVX-512 VNNI
multiplies unsigned by signed bytes). The query at C is rounded the same way per query head
(int8, scale qs). A key's score is then scale * qs * ks * (q8 . k8), whose dot product is an exact
integer (|q8 . k8| <= 127 * 127 * D, far below float32's 2^24 for D <= 256): mass_kernel's VNNI
pass and the eager ops here give the same integers. Rounding is half to even (torch.round) in
both the store and the reference. No vLLM import.
"""

import torch

OFFSET = 128  # stored = k8 + OFFSET, in [1, 255]
LEVELS = 127  # k8 and q8 in [-127, 127]


def rounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (round(x / s) in [-127, 127], s = max |x| / 127 [...]), float32 (float64 stays
    float64: the reference's)."""
    x = x if x.dtype == torch.float64 else x.float()
    s = x.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / LEVELS
    return torch.round(x / s[..., None]), s


def sketch_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., D] (any float dtype) -> (uint8 [..., D]: round(u / ks) + 128, float32 ks [...])."""
    k, s = rounded(keys)
    return (k + OFFSET).to(torch.uint8), s


def sketch_query(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [..., D] -> (int8 [..., D]: round(q / qs), float32 qs [...])."""
    k, s = rounded(q)
    return k.to(torch.int8), s


def block_lse_eager(q8: torch.Tensor, qs: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor]],
                    scale: float) -> torch.Tensor:  # fmt: skip
    """One row's block log-sum-exps from 8-bit keys, by PyTorch's ops (where the VNNI pass is not
    built): q8 [Hkv, g, D] int8, qs [Hkv, g]; pieces (keys [n, Hkv, B, D] uint8, ks [n, Hkv, B]) in
    block order -> [Hkv, g, nc]. The dot products are integers, exact in float32."""
    keys = torch.cat([k for k, _ in pieces]).float().sub_(OFFSET)  # [nc, Hkv, B, D]
    ks = torch.cat([s for _, s in pieces])  # [nc, Hkv, B]
    dots = torch.einsum("nhbd,hgd->hgnb", keys, q8.float())
    s = dots * ks.permute(1, 0, 2)[:, None] * (scale * qs)[..., None, None]
    return torch.logsumexp(s, dim=-1)
