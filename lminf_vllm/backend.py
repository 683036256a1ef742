"""The attention backend vLLM sees: a thin shell over `paths/`.
vLLM's types stop here: the builder turns CommonAttentionMetadata into a StepBatch, asks the
engine's path (chosen once, paths.choose) for the step's plan and counts its rows (metrics.py);
each layer's forward hands its tensors to the path's `run`. Registered as vLLM's `CUSTOM` backend
(the one member that survives into engine-core subprocesses); `--attention-backend lminf` aliases it.
"""

from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from lminf_vllm import metrics, paths
from lminf_vllm.model_support import check_layer_supported, uses_alibi
from lminf_vllm.step import EngineShape, LayerMath, StepBatch, published_requests
from lminf_vllm.vllm_compat import kv_cache_shape_api
from lminf_vllm.vllm_config import lminf_config_from_vllm

_CG_SUPPORT = {"never": AttentionCGSupport.NEVER, "uniform_decode": AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE}


class LminfAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # the cache layout is the path's
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


for _name, _attr in kv_cache_shape_api().items():  # per layer [blocks, kv heads, rows, K|V], as paths index it
    setattr(LminfAttentionBackend, _name, _attr)


@dataclass
class LminfMetadata:
    path: ModuleType  # the path module that planned the step
    plan: Any  # its Plan


def _engine_shape(vllm_config: VllmConfig, spec: AttentionSpec, device: torch.device) -> EngineShape:
    model = vllm_config.model_config
    return EngineShape(
        cfg=lminf_config_from_vllm(vllm_config), device_type=device.type, block_size=spec.block_size,
        num_heads=model.get_num_attention_heads(vllm_config.parallel_config), num_kv_heads=spec.num_kv_heads,
        head_size=spec.head_size, dtype=spec.dtype, rope=not uses_alibi(model.hf_config),
    )  # fmt: skip


class LminfMetadataBuilder(AttentionMetadataBuilder[LminfMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.shape = _engine_shape(vllm_config, kv_cache_spec, device)
        self.path = paths.choose(self.shape)

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec) -> AttentionCGSupport:
        device = torch.device(vllm_config.device_config.device)
        return _CG_SUPPORT[paths.choose(_engine_shape(vllm_config, kv_cache_spec, device)).CUDAGRAPH]

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build=False):
        m = common_attn_metadata
        batch = StepBatch(
            num_tokens=m.num_actual_tokens, num_reqs=m.num_reqs, query_start_loc=m.query_start_loc,
            query_start_loc_cpu=m.query_start_loc_cpu, seq_lens=m.seq_lens, block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping, max_query_len=m.max_query_len, max_seq_len=m.max_seq_len,
            **published_requests(m.num_reqs),  # request ids: the top-k host store's keys
        )  # fmt: skip
        return LminfMetadata(self.path, metrics.counted(self.path.plan(batch, self.shape)))  # rows for /metrics

    def build_for_cudagraph_capture(self, common_attn_metadata):  # dummy batches: no rows counted
        return metrics.uncounted(super().build_for_cudagraph_capture, common_attn_metadata)


class LminfAttentionImpl(AttentionImpl[LminfMetadata]):
    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:  # fmt: skip
        check_layer_supported(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks,
                              attn_type=attn_type, decoder=AttentionType.DECODER,
                              kv_sharing_target_layer_name=kv_sharing_target_layer_name)  # fmt: skip
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.cfg = lminf_config_from_vllm(get_current_vllm_config())  # the KV spec patch reads it
        self.rotary = None  # this layer's RoPE, bound after loading (patch_model_loader_base_loader)
        self.alibi_slopes = alibi_slopes
        self._math: LayerMath | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: LminfMetadata | None, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:  # fmt: skip
        # query [T, H, D] rotated at true positions; key, value [T, Hkv, D]; kv_cache [blocks, Hkv, B, 2D]
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("lminf attention has no fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        if self._math is None:  # once, on the first real step (before any CUDA graph capture)
            self._math = LayerMath.on_device(self.scale, self.rotary, self.alibi_slopes, query.device, layer.layer_name)
        attn_metadata.path.run(attn_metadata.plan, self._math, query, key, value, kv_cache, output)
        return output
