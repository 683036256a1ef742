"""The 8-bit scoring copy of the keys (topk_score "mass_int8"): how keys and queries are rounded.

docs/topk-contract.md, "Mass from 8-bit keys". The mass score reads every middle key per scoring
row; at 8 requests and more that reading is most of a decode step. The host store keeps, beside
each key at position 0 (which the attention reads), its 8-bit copy: per key and KV head a scale
ks = max |u| / 127 and the integers round(u / ks) + 128 in uint8 (the +128 because AVX-512 VNNI
multiplies unsigned by signed bytes), in tiles (`tiled`) where the block size allows. The query at
C is rounded the same way per query head (int8, scale qs). A key's score is then
scale * qs * ks * (q8 . k8), whose dot product is an exact integer (|q8 . k8| <= 127 * 127 * D,
below float32's 2^24 for D <= 1024): mass_kernel's VNNI pass and the eager ops here give the same
integers. Rounding is half to even (torch.round) in both the store and the reference. No vLLM
import.
"""

import torch

OFFSET = 128  # stored = k8 + OFFSET, in [1, 255]
LEVELS = 127  # k8 and q8 in [-127, 127]
TILE = 16  # keys a tile: one 64-byte vector holds 4 channels of each (tiled)


def rounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (round(x / s) in [-127, 127], s = max |x| / 127 [...]), float32 (float64 stays
    float64: the reference's)."""
    x = x if x.dtype == torch.float64 else x.float()
    s = x.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / LEVELS
    return torch.round(x / s[..., None]), s


def sketch_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., B, D] (any float dtype) -> (uint8 [..., B, D]: round(u / ks) + 128, tiled, float32
    ks [..., B]): as the store holds them."""
    k, s = rounded(keys)
    return tiled((k + OFFSET).to(torch.uint8)), s


def is_tiled(B: int, D: int) -> bool:
    """Are a block's B keys of D channels held in tiles (else in key order)?"""
    return B % TILE == 0 and D % 4 == 0


def tiled(k: torch.Tensor) -> torch.Tensor:
    """[..., B, D] in key order -> the same shape in tile order, where is_tiled: per tile of 16 keys,
    per 4 channels c .. c + 3, the 16 keys' 4 values one after another (VNNI's operand: 16 keys'
    products a vector, no sum across lanes). Contiguous."""
    *lead, B, D = k.shape
    if not is_tiled(B, D):
        return k.contiguous()
    return k.reshape(*lead, B // TILE, TILE, D // 4, 4).transpose(-3, -2).contiguous().view(*lead, B, D)


def untiled(k: torch.Tensor) -> torch.Tensor:
    """tiled's inverse: [..., B, D] in key order."""
    *lead, B, D = k.shape
    if not is_tiled(B, D):
        return k
    return k.reshape(*lead, B // TILE, D // 4, TILE, 4).transpose(-3, -2).reshape(*lead, B, D)


def sketch_query(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [..., D] -> (int8 [..., D]: round(q / qs), float32 qs [...])."""
    k, s = rounded(q)
    return k.to(torch.int8), s


def block_lse_eager(q8: torch.Tensor, qs: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor]],
                    scale: float) -> torch.Tensor:  # fmt: skip
    """One row's block log-sum-exps from 8-bit keys, by PyTorch's ops (where the VNNI pass is not
    built): q8 [Hkv, g, D] int8, qs [Hkv, g]; pieces (keys [n, Hkv, B, D] uint8, ks [n, Hkv, B]) in
    block order -> [Hkv, g, nc]. The dot products are integers, exact in float32."""
    keys = untiled(torch.cat([k for k, _ in pieces])).float().sub_(OFFSET)  # [nc, Hkv, B, D]
    ks = torch.cat([s for _, s in pieces])  # [nc, Hkv, B]
    dots = torch.einsum("nhbd,hgd->hgnb", keys, q8.float())
    s = dots * ks.permute(1, 0, 2)[:, None] * (scale * qs)[..., None, None]
    return torch.logsumexp(s, dim=-1)
