"""Dense reference of SPEC.md in plain PyTorch: the oracle every path is held to.

Nothing here is shared with the backend's fast path: keys and queries are
rotated at explicit positions (key at j, query at j + d) and the Λ-mask is an
explicit n x n matrix. Runs in float64 by default. No vLLM import.
"""

import json
from pathlib import Path

import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.rope import RotarySpec, cos_sin, default_inv_freq, rotate

ROW_CHUNK = 64  # query rows per step: bounds memory at O(ROW_CHUNK * n * H * D)


def lambda_mask_and_distance(n: int, cfg: LminfConfig, device=None):
    """SPEC.md per (query i, key j): visible [n, n] bool and distance d [n, n] long."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    rel = i - j
    local = (rel >= 0) & (rel < cfg.local_tokens)
    glob = (rel >= 0) & (j < cfg.global_tokens) & ~local
    dist = torch.where(local, rel, rel.clamp(max=cfg.distance_cap))
    return local | glob, dist


def dense_lambda_attention(q0, k0, v, cfg: LminfConfig, rotary: RotarySpec, scale: float):
    """q0 [n, H, D], k0 [n, Hkv, D] NOT rotated; v [n, Hkv, Dv]. -> [n, H, Dv] in q0's dtype."""
    n, H, D = q0.shape
    group = H // k0.shape[1]
    k0, v = k0.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    visible, dist = lambda_mask_and_distance(n, cfg, q0.device)
    j = torch.arange(n, device=q0.device)
    # Every position used below lies in [0, n): keys sit at j, and a query is
    # placed at j + d <= i. One cos/sin row per position.
    cos_t, sin_t = (t * rotary.attention_scaling for t in cos_sin(j, rotary.inv_freq, q0.dtype))  # as the model's table
    k_rot = rotate(k0, cos_t[:, None], sin_t[:, None], rotary)  # keys at their true position j
    out = torch.empty(n, H, v.shape[-1], dtype=q0.dtype, device=q0.device)
    for a in range(0, n, ROW_CHUNK):
        b = min(n, a + ROW_CHUNK)
        # Columns masked for every row of this chunk contribute exp(-inf) = 0:
        # skip them (the mask below is still applied to every remaining pair).
        cols = visible[a:b].any(dim=0).nonzero().flatten()
        pos_q = (cols[None, :] + dist[a:b, cols]).clamp(min=0)  # the query's position as seen from key j
        cos_q, sin_q = cos_t[pos_q], sin_t[pos_q]  # [rows, cols, F]
        q_rot = rotate(q0[a:b, None], cos_q[:, :, None], sin_q[:, :, None], rotary)  # [rows, cols, H, D]
        scores = (q_rot * k_rot[cols][None]).sum(-1) * scale  # [rows, cols, H]
        scores = scores.masked_fill(~visible[a:b, cols, None], float("-inf"))
        probs = torch.softmax(scores, dim=1)
        out[a:b] = torch.einsum("rjh,jhd->rhd", probs, v[cols])
    return out


def brute_force_lambda_attention(q0, k0, v, cfg: LminfConfig, rotary: RotarySpec, scale: float):
    """The same, one query and one key at a time, straight from SPEC.md's wording."""
    n, H, _ = q0.shape
    group = H // k0.shape[1]
    out = torch.zeros(n, H, v.shape[-1], dtype=q0.dtype)
    for i in range(n):
        for h in range(H):
            scores, values = [], []
            for j in range(i + 1):
                if not (j < cfg.global_tokens or i - j < cfg.local_tokens):
                    continue
                d = i - j if i - j < cfg.local_tokens else min(i - j, cfg.distance_cap)
                m = rotary.attention_scaling  # the model's cos/sin carry it (yarn)
                cq, sq = (t * m for t in cos_sin(torch.tensor(j + d), rotary.inv_freq, q0.dtype))
                ck, sk = (t * m for t in cos_sin(torch.tensor(j), rotary.inv_freq, q0.dtype))
                qr = rotate(q0[i, h], cq, sq, rotary)
                kr = rotate(k0[j, h // group], ck, sk, rotary)
                scores.append((qr * kr).sum() * scale)
                values.append(v[j, h // group])
            probs = torch.softmax(torch.stack(scores), dim=0)
            out[i, h] = (probs[:, None] * torch.stack(values)).sum(0)
    return out


def hf_rotary_spec(model_dir, head_dim: int, is_neox_style: bool = True) -> RotarySpec:
    """The model's RoPE as Hugging Face transformers derives it (scaling included).

    Independent of vLLM's rotary modules on purpose: the engine tests then hold
    vLLM's frequencies (as lminf reads them) against HF's.
    """
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(model_dir)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return RotarySpec(default_inv_freq(rope.get("rope_theta", 10000.0), rotary_dim), rotary_dim, is_neox_style)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    assert 2 * inv_freq.numel() == rotary_dim
    return RotarySpec(inv_freq.to(torch.float64), rotary_dim, is_neox_style, float(scaling))


class DenseLlama:
    """A Llama-family causal LM (Llama, Mistral, Qwen2) run densely from HF safetensors."""

    def __init__(self, model_dir, dtype=torch.float64):
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        self.config = json.loads((model_dir / "config.json").read_text())
        c = self.config
        self.w = {k: t.to(dtype) for k, t in load_file(str(model_dir / "model.safetensors")).items()}
        self.dtype = dtype
        self.n_layers = c["num_hidden_layers"]
        self.n_heads = c["num_attention_heads"]
        self.n_kv = c.get("num_key_value_heads", self.n_heads)
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.n_heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.rotary = hf_rotary_spec(model_dir, self.head_dim)
        self.max_position_embeddings = c["max_position_embeddings"]

    def _norm(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _linear(self, x, name):
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y + bias if bias is not None else y

    @torch.no_grad()
    def logits(self, token_ids, cfg: LminfConfig | None = None, attention=None) -> torch.Tensor:
        """[n, vocab] logits; cfg=None means plain full causal attention.

        attention: a function with dense_lambda_attention's signature (q0, k0, v, cfg, rotary,
        scale), called per layer in its place (e.g. topk_reference.dense_topk_attention with
        its keywords bound); None is dense_lambda_attention.
        """
        attention = attention or dense_lambda_attention
        n = len(token_ids)
        if cfg is None:
            cfg = LminfConfig(global_tokens=0, local_tokens=n, distance_cap=n)
        x = self.w["model.embed_tokens.weight"][torch.as_tensor(token_ids)]
        scale = self.head_dim**-0.5
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            h = self._norm(x, self.w[p + "input_layernorm.weight"])
            q = self._linear(h, p + "self_attn.q_proj").view(n, self.n_heads, self.head_dim)
            k = self._linear(h, p + "self_attn.k_proj").view(n, self.n_kv, self.head_dim)
            v = self._linear(h, p + "self_attn.v_proj").view(n, self.n_kv, self.head_dim)
            attn = attention(q, k, v, cfg, self.rotary, scale)
            x = x + self._linear(attn.reshape(n, -1), p + "self_attn.o_proj")
            h = self._norm(x, self.w[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(self._linear(h, p + "mlp.gate_proj"))
            x = x + self._linear(gate * self._linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        x = self._norm(x, self.w["model.norm.weight"])
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return x @ head.T

    def prompt_logprobs(self, token_ids, cfg: LminfConfig | None = None, attention=None) -> torch.Tensor:
        """[n - 1]: log p(token[t] | tokens[:t]) for t = 1 .. n-1, as vLLM's prompt_logprobs."""
        logp = torch.log_softmax(self.logits(token_ids, cfg, attention), dim=-1)
        ids = torch.as_tensor(token_ids)
        return logp[:-1].gather(1, ids[1:, None])[:, 0]
