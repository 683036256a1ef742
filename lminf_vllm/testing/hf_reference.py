"""Dense reference for any supported family: the Hugging Face model itself, Λ-attention swapped in.

The transformers model runs in float64 with its attention function replaced by
SPEC.md's: an explicit Λ-mask over all n keys, and for each global key past
the window the query re-rotated by min(i-j, C) - (i-j). Queries and keys reach
the function already rotated at their true positions 0..n-1 by the model's own
code, so partial rotary, interleaved pairs and scaled frequencies are the
model's, not ours; only the cos/sin are recomputed exactly (float64 angles)
where transformers would form them in float32. No vLLM import.
"""

import contextlib

import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.testing.reference import lambda_mask_and_distance
from lminf_vllm.rope import RotarySpec, cos_sin, default_inv_freq, exact_hf_rotary_forward, rotate

IMPLEMENTATION = "lminf_reference"
INTERLEAVED = ("gptj",)  # model types whose RoPE rotates pairs (x[2i], x[2i+1])
_active: dict = {}  # the (cfg, rotary) of the forward pass being run


def lambda_attention(q, k, v, cfg: LminfConfig, rotary: RotarySpec | None, scale: float, alibi=None):
    """q [B, H, n, D], k [B, Hkv, n, D] rotated at 0..n-1; v [B, Hkv, n, Dv]. -> [B, n, H, Dv].

    RoPE models pass their rotary; ALiBi models pass rotary=None and alibi [H]
    slopes, the bias being -m * d with d the distance SPEC.md shows.
    """
    n, H = q.shape[2], q.shape[1]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale  # every key at its true distance
    visible, dist = lambda_mask_and_distance(n, cfg, q.device)
    rel = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).to(q.device)
    G = min(cfg.global_tokens, n)
    if alibi is not None:
        scores = scores - alibi[None, :, None, None] * dist.to(scores.dtype)
    if G and rotary is not None:
        # global keys beyond the window: the query moved by min(i-j, C) - (i-j)
        delta = (dist[:, :G] - rel[:, :G]).clamp(max=0)  # [n, G], 0 where no cap applies
        cos, sin = cos_sin(delta, rotary.inv_freq, q.dtype)  # a pure rotation: no attention_scaling
        q_g = q[:, :, :, None].expand(-1, -1, -1, G, -1)  # [B, H, n, G, D]
        q_moved = rotate(q_g, cos[None, None], sin[None, None], rotary)
        scores[..., :G] = torch.einsum("bhigd,bhgd->bhig", q_moved, k[:, :, :G]) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhij,bhjd->bihd", torch.softmax(scores, dim=-1), v)


def _bloom_attention(module, slopes):
    """BLOOM's attention forward with the Λ-mask and capped ALiBi distances (float64 throughout)."""
    from transformers.models.bloom.modeling_bloom import dropout_add

    def forward(hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False, output_attentions=False, **kwargs):
        B, n, _ = hidden_states.shape
        q, k, v = module._reshape(module.query_key_value(hidden_states))  # [B, H, n, D] each
        out = lambda_attention(q, k, v, _active["cfg"], None, module.inv_norm_factor, slopes)
        context = module.dense(out.reshape(B, n, -1))
        return dropout_add(context, residual, module.hidden_dropout, False), None

    return forward


def _attention_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return lambda_attention(query, key, value, _active["cfg"], _active["rotary"], scale), None


def _gptj_attn(module):
    def _attn(query, key, value, attention_mask=None):
        out = lambda_attention(query, key, value, _active["cfg"], _active["rotary"], 1.0 / float(module.scale_attn))
        return out.transpose(1, 2), None  # GPT-J merges heads from [B, H, n, D]

    return _attn


class HFLambdaReference:
    """A transformers causal LM run densely under SPEC.md's Λ-attention (or plain causal)."""

    def __init__(self, model_dir, dtype=torch.float64):
        from transformers import AttentionInterface, AutoModelForCausalLM

        AttentionInterface.register(IMPLEMENTATION, _attention_interface)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        for m in self.model.modules():
            # A vLLM engine on its Transformers backend rewrites transformers'
            # model classes in place for torch.compile; this flag makes the
            # rewritten __call__ run the plain forward. (Its rewritten __init__
            # wants a vLLM config: build references before such an engine runs.)
            m.do_not_compile = True
        config = self.model.config
        self.model_type = config.model_type
        self.max_position_embeddings = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if self.model_type == "bloom":
            from transformers.models.bloom.modeling_bloom import build_alibi_tensor

            # transformers' own slopes: its bias at key 1 is m * 1
            H = config.n_head
            self.alibi = build_alibi_tensor(torch.ones(1, 2), H, torch.float64)[:, 0, 1]
            self.rotary = None
            for m in self.model.modules():
                if type(m).__name__ == "BloomAttention":
                    m.forward = _bloom_attention(m, self.alibi)
                elif type(m).__name__ == "BloomGelu":
                    # vLLM's BLOOM uses exact GELU where transformers uses the tanh
                    # approximation (8e-4 apart here): follow vLLM, so that only
                    # the attention is under test
                    m.forward = torch.nn.functional.gelu
        elif self.model_type == "gptj":
            head_dim = config.n_embd // config.n_head
            rotary_dim = config.rotary_dim or head_dim
            self.rotary = RotarySpec(default_inv_freq(10000.0, rotary_dim), rotary_dim, False)
            self._gptj = [m for m in self.model.modules() if hasattr(m, "embed_positions")]
            for m in self._gptj:
                m._attn = _gptj_attn(m)
        else:
            self.model.set_attn_implementation(IMPLEMENTATION)
            ropes = [m for m in self.model.modules() if hasattr(m, "inv_freq") and hasattr(m, "attention_scaling")]
            assert len(ropes) == 1, f"expected one rotary module, found {len(ropes)}"
            rope = ropes[0]
            rope.forward = exact_hf_rotary_forward(rope)
            inv_freq = rope.inv_freq.to(torch.float64)
            self.rotary = RotarySpec(inv_freq, 2 * inv_freq.numel(), self.model_type not in INTERLEAVED, float(rope.attention_scaling))

    @contextlib.contextmanager
    def _running(self, n: int, cfg: LminfConfig):
        if self.model_type == "gptj":
            # GPT-J reads sin/cos from a table of n_positions rows: give it n exact rows
            angles = torch.arange(n, dtype=torch.float64)[:, None] * self.rotary.inv_freq
            table = torch.cat((angles.sin(), angles.cos()), dim=1).to(self.model.dtype)
            for m in self._gptj:
                m.embed_positions = table
        _active.update(cfg=cfg, rotary=self.rotary)
        try:
            yield
        finally:
            _active.clear()

    @torch.no_grad()
    def logits(self, token_ids, cfg: LminfConfig | None = None) -> torch.Tensor:
        """[n, vocab] logits; cfg=None means plain full causal attention."""
        n = len(token_ids)
        cfg = cfg or LminfConfig(global_tokens=0, local_tokens=n, distance_cap=n)
        ids = torch.as_tensor([token_ids])
        with self._running(n, cfg):
            out = self.model(input_ids=ids, position_ids=torch.arange(n)[None], use_cache=False)
        return out.logits[0]

    def prompt_logprobs(self, token_ids, cfg: LminfConfig | None = None) -> torch.Tensor:
        """[n - 1]: log p(token[t] | tokens[:t]), as vLLM's prompt_logprobs."""
        logp = torch.log_softmax(self.logits(token_ids, cfg), dim=-1)
        ids = torch.as_tensor(token_ids)
        return logp[:-1].gather(1, ids[1:, None])[:, 0]
