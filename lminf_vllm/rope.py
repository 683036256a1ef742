"""Rotary position embedding as pure functions, exact at any position.

Angles are formed in float64 from the integer position and the model's own
inverse frequencies, then cast: float32 `position * inv_freq` loses about
position * 6e-8 radians, which past a few thousand tokens is visible.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RotarySpec:
    """What a layer's RoPE is: enough to rotate a vector by any angle multiple."""

    inv_freq: torch.Tensor  # [rotary_dim // 2], float64
    rotary_dim: int
    is_neox_style: bool  # halves (x[:d/2], x[d/2:]) vs interleaved pairs (x[0::2], x[1::2])
    # Factor on cos and sin (YaRN's mscale; 1 elsewhere). Stored q and k carry it
    # once each, so a re-rotation by a relative angle must not apply it again.
    attention_scaling: float = 1.0


def default_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    """HF's and vLLM's inverse frequencies (computed in float32 as they do)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return (1.0 / (base**exponent)).to(torch.float64)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of positions[..., None] * inv_freq, formed in float64. -> [..., rotary_dim/2]"""
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(positions.device, torch.float64)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def cos_sin_table(start: int, stop: int, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Rows [start, stop) of vLLM's cos_sin_cache layout: [n, rotary_dim] = cat(cos, sin) * scaling."""
    cos, sin = cos_sin(torch.arange(start, stop), inv_freq, torch.float64)
    return torch.cat((cos, sin), dim=-1) * scaling


class StepCosSin(torch.nn.Module):
    """cos/sin rows for one step's positions, in vLLM's cos_sin_cache layout.

    Positions inside the stock table read its rows (bit for bit what the stock
    module computes); positions past it get float64 angles, scaled, then cast.
    Nothing here grows with max_model_len; all tensor ops of fixed shape per
    step, so it traces under torch.compile and CUDA graphs. In eager mode on the
    host, the rows of the latest positions are kept: every layer of a step asks
    for the same ones (one module serves them all), and a decode step's ~8 small
    ops per layer would cost more than its attention on a small model.
    """

    def __init__(self, table: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
        super().__init__()
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("inv_freq", inv_freq.to(table.device, torch.float64), persistent=False)
        self.scaling = scaling
        self._latest = None  # (positions, dtype, rows, index): compared by value, never by identity

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (rows [n, rotary_dim] for positions [n], the index of each position's row: arange(n))."""
        reuse = positions.device.type == "cpu" and not torch.compiler.is_compiling()
        if reuse and self._latest is not None:
            seen, seen_dtype, rows, index = self._latest
            # by value: vLLM rewrites its positions buffer in place, through numpy
            if seen_dtype == dtype and seen.shape == positions.shape and torch.equal(seen, positions):
                return rows, index
        last = self.table.shape[0] - 1
        stock = self.table.index_select(0, positions.clamp(max=last))
        exact = torch.cat(cos_sin(positions, self.inv_freq, torch.float64), dim=-1)
        if self.scaling != 1.0:
            exact = exact * self.scaling
        rows = torch.where((positions <= last).unsqueeze(-1), stock, exact.to(stock.dtype)).to(dtype)
        index = torch.arange(positions.shape[0], device=positions.device)
        if reuse:
            self._latest = (positions.clone(), dtype, rows, index)
        return rows, index


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RotarySpec) -> torch.Tensor:
    """Rotate the first rotary_dim features of x. x: [..., D]; cos/sin broadcast to [..., rotary_dim/2]."""
    rot, rest = x[..., : spec.rotary_dim], x[..., spec.rotary_dim :]
    if spec.is_neox_style:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if not rest.shape[-1]:
        return rotated
    # cos/sin may broadcast x to more dimensions (one query, many angles): so must the unrotated part
    return torch.cat((rotated, rest.expand(*rotated.shape[:-1], rest.shape[-1])), dim=-1)


def exact_hf_rotary_forward(module):
    """A forward for a transformers rotary module (inv_freq, attention_scaling) with float64 angles.

    transformers forms position * inv_freq in float32; this returns the same
    cos/sin layout (halves repeated, scaled) computed exactly, then cast.
    """

    def forward(x, position_ids):
        cos, sin = cos_sin(position_ids, module.inv_freq.to(torch.float64), torch.float64)
        scaling = module.attention_scaling
        return (torch.cat((cos, cos), -1) * scaling).to(x.dtype), (torch.cat((sin, sin), -1) * scaling).to(x.dtype)

    return forward
