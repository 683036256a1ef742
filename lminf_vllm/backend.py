"""The attention backend vLLM sees: a thin shell over `lambda_attention`.

Registered as vLLM's `CUSTOM` backend (the only member that survives into
engine-core subprocesses); `--attention-backend lminf` is an alias of it.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from lminf_vllm.config import LminfConfig
from lminf_vllm.cpu_kernel_path import (
    KernelCall,
    kernel_attention,
    kernel_mode,
    plain,
    plain_kernel_call,
    plan_kernel,
    write_kv_kernel,
)
from lminf_vllm.cpu_kernel_prefill import prefill_attention
from lminf_vllm.lambda_attention import (
    CPU_KERNEL_LAYOUT,
    OWN_LAYOUT,
    DecodePlan,
    decode_lambda_attention,
    paged_lambda_attention,
    plan_decode,
    write_kv,
)
from lminf_vllm.model_support import uses_alibi
from lminf_vllm.rope import RotarySpec
from lminf_vllm.vllm_config import lminf_config_from_vllm


class LminfAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # the cache layout is ours
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["LminfAttentionImpl"]:
        return LminfAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["LminfMetadataBuilder"]:
        return LminfMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # lambda_attention indexes [block, head, row, K|V]: the identity layout.
        return (KVCacheLayout.LBHNC,)


@dataclass
class LminfMetadata:
    num_actual_tokens: int
    query_start: list[int]  # [num_reqs + 1], host ints: the loop over requests reads them
    seq_lens: list[int]  # [num_reqs] tokens computed after this step
    block_table: torch.Tensor  # [num_reqs, max_blocks]
    slot_mapping: torch.Tensor  # [num_tokens]
    # Requests with a single query this step (decodes): attended in one batch.
    decode_tokens: torch.Tensor  # [num_decodes] index of each one's query token
    decode_plans: list[DecodePlan]  # the slots they read, shared by all layers
    other_reqs: list[int]  # requests with several queries (prefill chunks)
    # CUDA with triton: the whole batch goes to one kernel launch, which reads
    # these device tensors; the host-side fields above are then left empty.
    query_start_loc: torch.Tensor | None = None  # [num_reqs + 1] int32
    seq_lens_tensor: torch.Tensor | None = None  # [num_reqs] int32
    decode_only: bool = False  # every request has one query: smaller tiles
    # CPU with vLLM's kernel (cpu_kernel_path): the cache is in its layout, and
    # the rows it can serve go to one call of it; the rest take the paths above.
    kernel_isa: str | None = None
    kernel_calls: list[KernelCall] = field(default_factory=list)


class LminfMetadataBuilder(AttentionMetadataBuilder[LminfMetadata]):
    # (the base class declares __init__ abstract)
    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.cfg = lminf_config_from_vllm(vllm_config)
        self.use_triton = False
        # Imported only here: the CPU path never loads triton. ALiBi models
        # (no bias in the kernel yet) take the torch path on CUDA too.
        if device.type == "cuda" and not uses_alibi(vllm_config.model_config.hf_config):
            from lminf_vllm.triton_lambda_attention import triton_available

            self.use_triton = triton_available()
        spec = kv_cache_spec
        self.kernel_isa = kernel_mode(
            device.type, not uses_alibi(vllm_config.model_config.hf_config), spec.dtype,
            spec.block_size, spec.num_kv_heads, spec.head_size,
        )  # fmt: skip
        self.num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> LminfMetadata:
        m = common_attn_metadata
        if self.use_triton:  # no host lists, no decode plans: the kernel finds its own rows
            return LminfMetadata(
                num_actual_tokens=m.num_actual_tokens,
                query_start=[],
                seq_lens=[],
                block_table=m.block_table_tensor[: m.num_reqs],
                slot_mapping=m.slot_mapping,
                decode_tokens=m.slot_mapping.new_empty(0),
                decode_plans=[],
                other_reqs=[],
                query_start_loc=m.query_start_loc[: m.num_reqs + 1],
                seq_lens_tensor=m.seq_lens[: m.num_reqs],
                decode_only=m.max_query_len == 1,
            )
        if self.kernel_isa is not None and plain(m.max_seq_len, self.cfg):
            # Every query sees every key before it, at its true distance: the
            # whole batch is plain causal attention, vLLM's kernel as it is.
            return self._plain_batch(m)
        query_start = m.query_start_loc_cpu[: m.num_reqs + 1].tolist()
        seq_lens = m.seq_lens[: m.num_reqs].cpu().tolist()
        block_table = m.block_table_tensor[: m.num_reqs]
        lengths = [b - a for a, b in zip(query_start, query_start[1:])]
        dev = block_table.device
        kernel_calls, rest = [], list(range(m.num_reqs))
        if self.kernel_isa is not None:
            spec = self.kv_cache_spec
            requests = [(r, query_start[r], t, n) for r, (t, n) in enumerate(zip(lengths, seq_lens))]
            kernel_calls, left = plan_kernel(
                requests, block_table, self.cfg, spec.block_size, self.kernel_isa,
                self.num_heads, spec.num_kv_heads, spec.head_size, spec.dtype,
            )  # fmt: skip
            rest = [r[0] for r in left]
        decodes = [r for r in rest if lengths[r] == 1]
        decode_seq_lens = torch.tensor([seq_lens[r] for r in decodes], dtype=torch.long, device=dev)
        decode_table = block_table.index_select(0, torch.tensor(decodes, dtype=torch.long, device=dev))
        return LminfMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start=query_start,
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=m.slot_mapping,
            decode_tokens=torch.tensor([query_start[r] for r in decodes], dtype=torch.long, device=dev),
            decode_plans=plan_decode(decode_seq_lens, decode_table, self.cfg, self.kv_cache_spec.block_size),
            other_reqs=[r for r in rest if lengths[r] > 1],
            kernel_isa=self.kernel_isa,
            kernel_calls=kernel_calls,
        )

    def _plain_batch(self, m: CommonAttentionMetadata) -> LminfMetadata:
        spec = self.kv_cache_spec
        call = plain_kernel_call(
            m.query_start_loc[: m.num_reqs + 1], m.seq_lens[: m.num_reqs], m.block_table_tensor[: m.num_reqs],
            self.cfg, self.kernel_isa, self.num_heads, spec.num_kv_heads, spec.head_size, spec.dtype,
        )  # fmt: skip
        return LminfMetadata(
            num_actual_tokens=m.num_actual_tokens, query_start=[], seq_lens=[], block_table=call.block_table,
            slot_mapping=m.slot_mapping, decode_tokens=m.slot_mapping.new_empty(0, dtype=torch.long),
            decode_plans=[], other_reqs=[], kernel_isa=self.kernel_isa, kernel_calls=[call],
        )  # fmt: skip


class LminfAttentionImpl(AttentionImpl[LminfMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "sliding_window": sliding_window is not None,
            "logits_soft_cap": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"attn_type={attn_type}": attn_type != AttentionType.DECODER,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name is not None,
        }
        bad = [name for name, present in unsupported.items() if present]
        if bad:
            raise ValueError(f"lminf attention does not support this layer's {', '.join(bad)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.cfg: LminfConfig = lminf_config_from_vllm(get_current_vllm_config())
        # Set after the model is built (patch_model_loader_base_loader): the
        # rotary embedding of the layer that owns this attention.
        self.rotary: RotarySpec | None = None
        self._inv_freq: torch.Tensor | None = None  # rotary.inv_freq on the GPU, copied once
        # ALiBi models (no RoPE): per-head slopes of the bias -m * d.
        self.alibi = None if alibi_slopes is None else torch.tensor(alibi_slopes, dtype=torch.float32)

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,  # [T, H, D], rotated at true positions
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, Dv]
        kv_cache: torch.Tensor,  # [num_blocks, Hkv, B, 2 * D]
        attn_metadata: LminfMetadata | None,
        output: torch.Tensor,  # [T, H, Dv]
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("lminf attention has no fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        if self.rotary is None and self.alibi is None:
            raise RuntimeError(
                "lminf attention layer was never bound to its rotary embedding; "
                "the model loader patch did not run"
            )
        md = attn_metadata
        n = md.num_actual_tokens
        if self.alibi is not None and self.alibi.device != query.device:
            self.alibi = self.alibi.to(query.device)
        if md.kernel_isa is not None:
            write_kv_kernel(kv_cache, key[:n], value[:n], md.slot_mapping[:n], md.kernel_isa)
        else:
            write_kv(kv_cache, key[:n], value[:n], md.slot_mapping[:n])
        if md.query_start_loc is not None:  # the builder chose Triton (CUDA, RoPE model)
            return self._forward_triton(query, kv_cache, md, output)
        if md.kernel_calls:
            kernel_attention(query, kv_cache, md.kernel_calls, self.scale, self.rotary, md.kernel_isa, output)
        layout = OWN_LAYOUT if md.kernel_isa is None else CPU_KERNEL_LAYOUT
        if md.decode_tokens.numel():
            output[md.decode_tokens] = decode_lambda_attention(
                query[md.decode_tokens], kv_cache, md.decode_plans, self.scale, self.rotary, self.alibi, layout
            ).to(output.dtype)
        for r in md.other_reqs:
            a, b = md.query_start[r], md.query_start[r + 1]
            if md.kernel_isa is not None:  # prefill past the window: the kernel on a scratch cache
                out = prefill_attention(
                    query[a:b], kv_cache, md.block_table[r], md.seq_lens[r], self.cfg, self.scale, self.rotary, layout
                )  # fmt: skip
            else:
                out = paged_lambda_attention(
                    query[a:b], kv_cache, md.block_table[r], md.seq_lens[r], self.cfg, self.scale, self.rotary,
                    self.alibi, layout,
                )  # fmt: skip
            output[a:b] = out.to(output.dtype)
        return output

    def _forward_triton(self, query, kv_cache, md: LminfMetadata, output):
        """The same attention as the loop above, one Triton call (two or three launches) for the whole batch."""
        from lminf_vllm.triton_lambda_attention import triton_lambda_attention

        if self._inv_freq is None or self._inv_freq.device != query.device:
            self._inv_freq = self.rotary.inv_freq.to(query.device, torch.float64)
        return triton_lambda_attention(
            query, kv_cache, output, md.query_start_loc, md.seq_lens_tensor, md.block_table,
            self.cfg, self.scale, self._inv_freq, self.rotary.rotary_dim, self.rotary.is_neox_style,
            decode_only=md.decode_only,
        )  # fmt: skip
