"""Write patches/*.diff: each runtime patch as a change to vLLM's own source.

These are what we would send upstream so the runtime patches can go. Each edit
is a (file, old text, new text) applied to the installed vLLM; the script fails
if an old text is missing, and `tests/test_patches.py` re-runs it in check mode
so the diffs never drift from the supported vLLM.

    python patches/make_diffs.py           # rewrite the diffs
    python patches/make_diffs.py --check   # exit 1 if any diff is stale
"""

import argparse
import difflib
import sys
from pathlib import Path

HERE = Path(__file__).parent

EDITS = {
    "patch_attention_backends_registry": [(
        "v1/attention/backends/registry.py",
        '''    def __getitem__(cls, name: str):
        """Get backend by name with helpful error messages."""
        try:
            return super().__getitem__(name)
''',
        '''    def __getitem__(cls, name: str):
        """Get backend by name with helpful error messages."""
        if name.upper() in _ATTN_ALIASES:
            return _ATTN_ALIASES[name.upper()]
        try:
            return super().__getitem__(name)
''',
    ), (
        "v1/attention/backends/registry.py",
        '''_ATTN_OVERRIDES: dict[AttentionBackendEnum, str] = {}
''',
        '''_ATTN_OVERRIDES: dict[AttentionBackendEnum, str] = {}
# Extra names for registered backends (e.g. "LMINF" -> CUSTOM): they resolve to
# the member, so they pickle as the member and survive into subprocesses.
_ATTN_ALIASES: dict[str, AttentionBackendEnum] = {}


def register_backend_alias(alias: str, backend: AttentionBackendEnum) -> None:
    _ATTN_ALIASES[alias.upper()] = backend
''',
    )],
    "patch_platforms_cpu": [(
        "platforms/cpu.py",
        '''        if selected_backend and selected_backend != AttentionBackendEnum.CPU_ATTN:
            logger.info("Cannot use %s backend on CPU.", selected_backend)
''',
        '''        if (
            selected_backend == AttentionBackendEnum.CUSTOM
            and selected_backend.is_overridden()
        ):
            return selected_backend.get_path()
        if selected_backend and selected_backend != AttentionBackendEnum.CPU_ATTN:
            logger.info("Cannot use %s backend on CPU.", selected_backend)
''',
    ), (
        "platforms/cpu.py",
        '''    dispatch_key: str = "CPU"
    dist_backend: str = "gloo"
''',
        '''    dispatch_key: str = "CPU"
    # Ray's own name for a CPU: each Ray worker's placement-group bundle holds one.
    ray_device_key: str = "CPU"
    dist_backend: str = "gloo"
''',
    )],
    "patch_executor_ray_executor_v2": [(
        "v1/executor/ray_executor_v2.py",
        '''        if device_key == "GPU":
            return {"num_gpus": num_devices}
''',
        '''        if device_key == "GPU":
            return {"num_gpus": num_devices}
        if device_key == "CPU":
            # The placement-group bundle holds the CPU; Ray refuses "CPU" in
            # resources (num_cpus is given by the caller).
            return {"num_gpus": 0}
''',
    ), (
        "v1/executor/ray_executor_v2.py",
        '''        physical_gpu_ids = ray.get_runtime_context().get_accelerator_ids()[device_key]
''',
        '''        if device_key == "CPU":
            return node_id, []  # a CPU worker binds no device
        physical_gpu_ids = ray.get_runtime_context().get_accelerator_ids()[device_key]
''',
    )],
    "patch_attention_layer": [(
        "model_executor/layers/attention/attention.py",
        '''        else:
            return FullAttentionSpec(
                block_size=block_size,
                num_kv_heads=self.num_kv_heads,
                head_size=self.head_size,
                head_size_v=self.head_size_v,
                dtype=self.kv_cache_torch_dtype,
                kv_quant_mode=quant_mode,
            )
''',
        '''        else:
            # The backend owns its packing and may bound what a sequence keeps
            # (e.g. a Λ-shaped or other sparse retention policy).
            return self.attn_backend.customize_spec(
                FullAttentionSpec(
                    block_size=block_size,
                    num_kv_heads=self.num_kv_heads,
                    head_size=self.head_size,
                    head_size_v=self.head_size_v,
                    dtype=self.kv_cache_torch_dtype,
                    kv_quant_mode=quant_mode,
                )
            )
''',
    )],
    "patch_worker_gpu_model_runner": [(
        "v1/worker/gpu_model_runner.py",
        '''        for i in discard_sampled_tokens_req_indices:
            gen = self.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)
''',
        '''        for i in discard_sampled_tokens_req_indices:
            gen = self.input_batch.generators.get(int(i))
            if gen is None:
                continue
            if gen.device.type == "cpu":
                # CPU generators have no offset: restore the state saved
                # before sampling (see _sample).
                gen.set_state(self._rng_states_before_sampling[int(i)])
            else:
                gen.set_offset(gen.get_offset() - 4)
''',
    ), (
        "v1/worker/gpu_model_runner.py",
        '''        # Sample the next token and get logprobs if needed.
        sampling_metadata = self.input_batch.sampling_metadata
''',
        '''        # Sample the next token and get logprobs if needed.
        sampling_metadata = self.input_batch.sampling_metadata
        # Seeded CPU generators of rows whose sample is discarded (partial
        # prefill) are rewound by state after sampling.
        num_reqs = self.input_batch.num_reqs
        self._rng_states_before_sampling = {
            int(i): gen.get_state()
            for i in np.nonzero(self.discard_request_mask.np[:num_reqs])[0]
            if (gen := self.input_batch.generators.get(int(i))) is not None
            and gen.device.type == "cpu"
        }
''',
    ), (
        "v1/attention/backend.py",
        '''    req_idx: np.ndarray | None = None
    """(batch_size,) index of each row's request in the runner's request
    table. Rows of one request are adjacent, so equal neighbours are PCP
    chunks sharing one KV context."""
''',
        '''    req_idx: np.ndarray | None = None
    """(batch_size,) index of each row's request in the runner's request
    table. Rows of one request are adjacent, so equal neighbours are PCP
    chunks sharing one KV context."""

    req_ids: list[str] | None = None
    """vLLM's request id of each real (unpadded) row, in the block table's
    order, for backends that keep state per request across steps (see
    AttentionMetadataBuilder.on_requests_finished). None in dummy runs and
    micro-batch slices."""

    is_dummy_run: bool = False
    """Built for a dummy run (profiling, warm-up, graph capture): no row is a
    real request, so a backend that needs req_ids can tell this from a step
    whose ids are missing."""
''',
    ), (
        "v1/attention/backend.py",
        '''            req_idx=maybe_slice_reqs(self.req_idx),
''',
        '''            req_idx=maybe_slice_reqs(self.req_idx),
            req_ids=maybe_slice_reqs(self.req_ids),
''',
    ), (
        "v1/attention/backend.py",
        '''    def update_block_table(
''',
        '''    def on_requests_finished(self, req_ids: set[str]) -> None:
        """Requests that ended (finished or aborted) or were preempted since
        the last step: drop any state kept for them under
        CommonAttentionMetadata.req_ids (a preempted request is computed again
        from its first token). Called by the model runner before the step's
        metadata is built."""
        return None

    def update_block_table(
''',
    ), (
        "v1/worker/gpu_model_runner.py",
        '''        self.late_interaction_runner.on_requests_finished(
            scheduler_output.finished_req_ids
        )
''',
        '''        self.late_interaction_runner.on_requests_finished(
            scheduler_output.finished_req_ids
        )
        if gone := scheduler_output.finished_req_ids | (
            scheduler_output.preempted_req_ids or set()
        ):
            for attn_group in self._attn_group_iterator():
                for builder in attn_group.metadata_builders:
                    builder.on_requests_finished(gone)
''',
    ), (
        "v1/worker/gpu_model_runner.py",
        '''            rswa_prefix_lens=rswa_prefix_lens,
        )
''',
        '''            rswa_prefix_lens=rswa_prefix_lens,
            # A scheduled step's requests; dummy runs have none.
            req_ids=(
                self.input_batch.req_ids[:num_reqs]
                if num_scheduled_tokens is not None
                else None
            ),
            is_dummy_run=num_scheduled_tokens is None,
        )
''',
    ), (
        "v1/worker/gpu_model_runner.py",
        '''        self.input_batch.remove_request(req_id)
        req_state = self.requests[req_id]

        req_state.prompt_token_ids = new_req_data.prompt_token_ids
''',
        '''        row = self.input_batch.remove_request(req_id)
        req_state = self.requests[req_id]

        if start := new_req_data.prompt_start:
            # Only the new tokens came: this worker holds the rest (its last
            # prompt and what it sampled; an in-process executor shares the
            # scheduler's list, which is whole already).
            prompt = req_state.prompt_token_ids
            if len(prompt) != start + len(new_req_data.prompt_token_ids):
                prompt.extend(req_state.output_token_ids[: start - len(prompt)])
                prompt.extend(new_req_data.prompt_token_ids)
            new_req_data.prompt_token_ids = prompt
            # The row it left holds the first `start` tokens.
            req_state.row_holds = (row, start) if row is not None else None
        req_state.prompt_token_ids = new_req_data.prompt_token_ids
''',
    )],
    "patch_engine_arg_utils": [(
        "config/model.py",
        '''            if envs.VLLM_ALLOW_LONG_MAX_MODEL_LEN:
''',
        '''            if getattr(hf_config, "attention_extends_positions", False):
                pass  # the attention backend caps distances: nothing runs off the table
            elif envs.VLLM_ALLOW_LONG_MAX_MODEL_LEN:
''',
    ), (
        "config/model.py",
        '''                and torch_dtype in (torch.float16, torch.float32)
            ):
                torch_dtype = torch.bfloat16
''',
        '''                and torch_dtype in (torch.float16, torch.float32)
            ):
                torch_dtype = torch.bfloat16
            if (
                current_platform.is_cpu()
                and current_platform.get_cpu_architecture() == CpuArchEnum.X86
                and torch_dtype == torch.bfloat16
                and not torch.cpu._is_avx512_bf16_supported()
                and not torch.cpu._is_amx_tile_supported()
            ):
                # No bfloat16 instructions: every bfloat16 matmul would be emulated.
                torch_dtype = torch.float32
''',
    )],
    "patch_config_vllm": [(
        "config/vllm.py",
        '''    def __post_init__(self):
''',
        '''    def _validate_attention_backend(self) -> None:
        """Let the selected backend refuse settings it cannot serve, at start-up,
        and turn prefix caching off where the backend cannot reuse cached blocks."""
        backend = self.attention_config.backend
        if backend is not None and backend.is_overridden():
            backend_cls = backend.get_class()
            if hasattr(backend_cls, "validate_vllm_config"):
                backend_cls.validate_vllm_config(self)
            if (
                self.cache_config.enable_prefix_caching
                and hasattr(backend_cls, "supports_prefix_caching")
                and not backend_cls.supports_prefix_caching(self)
            ):
                # Before try_verify_and_update_config, as for the encoder-only
                # instances below, so model config hooks see it disabled.
                logger.info(
                    "Disabling prefix caching: the %s attention backend cannot "
                    "reuse cached blocks with this configuration.",
                    backend_cls.get_name(),
                )
                self.cache_config.enable_prefix_caching = False

    def __post_init__(self):
''',
    ), (
        "config/vllm.py",
        '''        self._resolve_mm_encoder_only()
''',
        '''        self._validate_attention_backend()
        self._resolve_mm_encoder_only()
''',
    )],
    "patch_model_loader_base_loader": [(
        "model_executor/layers/rotary_embedding/base.py",
        '''    def get_cos_sin(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
''',
        '''    def cos_sin_rows(
        self, positions: torch.Tensor, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos/sin rows for the step's positions, each position's row).

        The table's rows where it has them; past it (a backend that caps
        distances serves past max_position_embeddings) exact float64 angles
        from the same frequencies, so no table grows with max_model_len.
        Scaled subclasses fold their factor into _compute_inv_freq's result
        and their mscale into the rows, as their _compute_cos_sin_cache does.
        """
        table = self._match_cos_sin_cache_dtype(query)
        last = table.shape[0] - 1
        inv_freq = self._compute_inv_freq(self.base).to(positions.device, torch.float64)
        angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
        exact = torch.cat((angles.cos(), angles.sin()), dim=-1).to(table.dtype)
        inside = (positions <= last).unsqueeze(-1)
        rows = torch.where(inside, table.index_select(0, positions.clamp(max=last)), exact)
        return rows, torch.arange(positions.shape[0], device=positions.device)

    def get_cos_sin(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
''',
    ), (
        "model_executor/layers/rotary_embedding/base.py",
        '''        from vllm import _custom_ops as ops

        cos_sin_cache = self._match_cos_sin_cache_dtype(query)

        # ops.rotary_embedding() is an in-place operation
        # that updates the query and key tensors.
        ops.rotary_embedding(
            positions,
            query,
            key,
            self.head_size,
            cos_sin_cache,
            self.is_neox_style,
        )
        return query, key

    def extra_repr(self) -> str:
''',
        '''        from vllm import _custom_ops as ops

        # (forward_native and forward_cuda the same way)
        cos_sin_cache, positions = self.cos_sin_rows(positions.flatten(), query)

        # ops.rotary_embedding() is an in-place operation
        # that updates the query and key tensors.
        ops.rotary_embedding(
            positions,
            query,
            key,
            self.head_size,
            cos_sin_cache,
            self.is_neox_style,
        )
        return query, key

    def extra_repr(self) -> str:
''',
    ), (
        "model_executor/model_loader/base_loader.py",
        '''            process_weights_after_loading(model, model_config, target_device)
''',
        '''            process_weights_after_loading(model, model_config, target_device)
            # Attention backends that re-rotate queries need the layer's RoPE.
            for module in model.modules():
                rope = getattr(module, "rotary_emb", None)
                attn = getattr(module, "attn", None)
                if rope is not None and hasattr(getattr(attn, "impl", None), "bind_rotary"):
                    attn.impl.bind_rotary(rope)
''',
    )],
    "patch_worker_gpu_input_batch": [(
        "v1/worker/gpu_input_batch.py",
        '''        # TODO(woosuk): This buffer could be too large if max_model_len is big.
        # Find a way to reduce the CPU memory usage.
        # This buffer is not directly transferred to the GPU, so it does not
        # need to be pinned.
        self.token_ids_cpu_tensor = torch.zeros(
            (max_num_reqs, max_model_len),
            device="cpu",
            dtype=torch.int32,
            pin_memory=False,
        )
        self.token_ids_cpu = self.token_ids_cpu_tensor.numpy()
        self.is_token_ids_tensor = torch.zeros(
            (max_num_reqs, max_model_len),
            device="cpu",
            dtype=bool,
            pin_memory=False,
        )
        self.is_token_ids = self.is_token_ids_tensor.numpy()
''',
        '''        # Reserved as address space, not allocated: a page becomes memory when
        # a request writes into it, so a row costs the tokens its request holds
        # and max_model_len may be as large as a backend can serve (2^30).
        # This buffer is not directly transferred to the GPU, so it does not
        # need to be pinned.
        self._token_rows = LazyZeros(max_num_reqs, max_model_len, torch.int32)
        self.token_ids_cpu_tensor = self._token_rows.tensor
        self.token_ids_cpu = self._token_rows.array
        self._flag_rows = LazyZeros(max_num_reqs, max_model_len, torch.bool)
        self.is_token_ids_tensor = self._flag_rows.tensor
        self.is_token_ids = self._flag_rows.array
''',
    ), (
        "v1/worker/gpu_input_batch.py",
        '''        # Trim lists to the batch size.
        del self._req_ids[num_reqs:]
''',
        '''        # Rows past the batch are empty now, whether a removal or a move left
        # them so: their pages go back (and a row a new request took, past
        # what it wrote). A streaming session's next chunk removes and re-adds
        # its request within the step: its row stays.
        for rows in (self._token_rows, self._flag_rows):
            rows.release_rows(range(num_reqs, len(self._req_ids)))

        # Trim lists to the batch size.
        del self._req_ids[num_reqs:]
''',
    ), (
        "v1/worker/gpu_input_batch.py",
        '''from vllm.utils.collection_utils import swap_dict_values
''',
        '''from vllm.utils.collection_utils import swap_dict_values
from vllm.utils.lazy_zeros import LazyZeros  # lminf_vllm/lazy_zeros.py, as it is
''',
    ), (
        "v1/worker/gpu_input_batch.py",
        '''        if request.prompt_token_ids is not None:
            self.token_ids_cpu[req_index, :num_prompt_tokens] = request.prompt_token_ids
            if request.prompt_is_token_ids is not None:
                self.is_token_ids[req_index, :num_prompt_tokens] = (
                    request.prompt_is_token_ids
                )
            else:
                self.is_token_ids[req_index, :num_prompt_tokens] = True
''',
        '''        if request.prompt_token_ids is not None:
            # A streaming session back in the row it left this step: the row
            # holds its first tokens already, so write only the new ones.
            held = 0
            if request.row_holds is not None and request.row_holds[0] == req_index:
                held = request.row_holds[1]
            request.row_holds = None
            self.token_ids_cpu[req_index, held:num_prompt_tokens] = (
                request.prompt_token_ids[held:]
            )
            if request.prompt_is_token_ids is not None:
                self.is_token_ids[req_index, held:num_prompt_tokens] = (
                    request.prompt_is_token_ids[held:]
                )
            else:
                self.is_token_ids[req_index, held:num_prompt_tokens] = True
''',
    ), (
        "v1/worker/gpu_input_batch.py",
        '''    prompt_is_token_ids: list[bool] | None = None
''',
        '''    prompt_is_token_ids: list[bool] | None = None
    # (row, tokens): a streaming session's row, left this step, and how many
    # of its next prompt's tokens it holds (see _update_streaming_request).
    row_holds: tuple[int, int] | None = None
''',
    )],
    "patch_metrics_stats": [(
        "v1/metrics/stats.py",
        """    perf_stats: PerfStats | None = None
""",
        """    perf_stats: PerfStats | None = None

    # Counts that plugins (KV cache managers, attention backends) add for their
    # stat loggers: keys and meaning are the plugin's own.
    plugin_stats: dict[str, Any] | None = None
""",
    )],
    "patch_worker_gpu_worker": [(
        "v1/outputs.py",
        """    # information related to cudagraph execution
    cudagraph_stats: CUDAGraphStat | None = None
""",
        """    # information related to cudagraph execution
    cudagraph_stats: CUDAGraphStat | None = None

    # Totals since start-up that the attention backend's metadata builder
    # counts for stat loggers (e.g. query rows per kernel); the scheduler puts
    # the latest on SchedulerStats.plugin_stats.
    backend_stats: dict[str, int] | None = None
""",
    ), (
        "v1/worker/gpu_worker.py",
        """    def sample_tokens(
        self, grammar_output: "GrammarOutput | None"
    ) -> ModelRunnerOutput | AsyncModelRunnerOutput:
        return self.model_runner.sample_tokens(grammar_output)
""",
        """    def sample_tokens(
        self, grammar_output: "GrammarOutput | None"
    ) -> ModelRunnerOutput | AsyncModelRunnerOutput:
        output = self.model_runner.sample_tokens(grammar_output)
        if isinstance(output, ModelRunnerOutput) and output.req_ids:
            output.backend_stats = self.model_runner.attention_backend_stats()
        return output
""",
    ), (
        "v1/worker/gpu_model_runner.py",
        """    def _attn_group_iterator(self) -> Iterator[AttentionGroup]:
""",
        """    def attention_backend_stats(self) -> dict[str, int] | None:
        \"\"\"What the attention metadata builders count for stat loggers (merged).\"\"\"
        merged: dict[str, int] = {}
        for group in self._attn_group_iterator():
            for builder in group.metadata_builders:
                merged.update(builder.stats() or {})
        return merged or None

    def _attn_group_iterator(self) -> Iterator[AttentionGroup]:
""",
    ), (
        "v1/attention/backend.py",
        """    def build_for_cudagraph_capture(
        self, common_attn_metadata: CommonAttentionMetadata
    ) -> M:
""",
        """    def stats(self) -> dict[str, int] | None:
        \"\"\"Totals since start-up for stat loggers (e.g. query rows per kernel),
        sent with the worker's output (ModelRunnerOutput.backend_stats).\"\"\"
        return None

    def build_for_cudagraph_capture(
        self, common_attn_metadata: CommonAttentionMetadata
    ) -> M:
""",
    )],
    "patch_engine_input_processor": [(
        "v1/engine/input_processor.py",
        """            sampling_params.update_from_generation_config(
                self.generation_config_fields,
                self.renderer.get_eos_token_id(),
            )
""",
        """            # A backend with memory per request of its own (a host KV store
            # with a cap) refuses a request that could never fit, as a prompt
            # past max_model_len is refused above.
            backend_cls = self.vllm_config.attention_config.backend_cls
            if backend_cls is not None and (
                why := backend_cls.validate_request(
                    self.vllm_config, prompt_len, sampling_params.max_tokens
                )
            ):
                raise VLLMValidationError(
                    why, parameter="max_tokens", value=sampling_params.max_tokens
                )

            sampling_params.update_from_generation_config(
                self.generation_config_fields,
                self.renderer.get_eos_token_id(),
            )
""",
    )],
    "patch_core_sched_scheduler": [(
        "v1/core/sched/scheduler.py",
        """                # Replayed tokens are already counted in the adopted hit; a
                # chunk that ends inside the replayed range needs no new slots.
""",
        """                # A KV manager with memory of its own beside the pool (a
                # host store) may hold a new request back, as when blocks run
                # out: it stays first in the waiting queue.
                if not self.kv_cache_manager.can_admit(request, self.running):
                    if request.has_encoder_inputs:
                        self.encoder_cache_manager.free(request)
                    break

                # Replayed tokens are already counted in the adopted hit; a
                # chunk that ends inside the replayed range needs no new slots.
""",
    ), (
        "v1/core/sched/scheduler.py",
        """            perf_stats=perf_stats,
            ec_connector_stats=ec_connector_stats_payload,
        )
""",
        """            perf_stats=perf_stats,
            ec_connector_stats=ec_connector_stats_payload,
            plugin_stats={
                **(self.kv_cache_manager.make_plugin_stats() or {}),
                **self.backend_stats,
            }
            or None,
        )
""",
    ), (
        "v1/core/sched/scheduler.py",
        """        cudagraph_stats = model_runner_output.cudagraph_stats
""",
        """        cudagraph_stats = model_runner_output.cudagraph_stats
        if model_runner_output.backend_stats:
            self.backend_stats = model_runner_output.backend_stats
""",
    ), (
        "v1/core/sched/scheduler.py",
        """        self.perf_metrics: ModelMetrics | None = None
""",
        """        self.perf_metrics: ModelMetrics | None = None
        # The attention backend's latest totals from the workers (plugin_stats).
        self.backend_stats: dict[str, int] = {}
""",
    ), (
        "v1/core/kv_cache_manager.py",
        """    def make_prefix_cache_stats(self) -> PrefixCacheStats | None:
""",
        """    def make_plugin_stats(self) -> dict[str, int] | None:
        \"\"\"What the KV cache managers add to SchedulerStats.plugin_stats (merged).\"\"\"
        merged: dict[str, int] = {}
        for manager in self.coordinator.single_type_managers:
            merged.update(manager.make_plugin_stats() or {})
        return merged or None

    def make_prefix_cache_stats(self) -> PrefixCacheStats | None:
""",
    ), (
        "v1/core/single_type_kv_cache_manager.py",
        """    def new_step_starts(self) -> None:
        return None


class FullAttentionManager(SingleTypeKVCacheManager):
""",
        """    def new_step_starts(self) -> None:
        return None

    def make_plugin_stats(self) -> dict[str, int] | None:
        \"\"\"Counts for stat-logger plugins, once per step (none by default).\"\"\"
        return None


class FullAttentionManager(SingleTypeKVCacheManager):
""",
    ), (
        "v1/core/sched/output.py",
        """    # DeepSeek-V4.1 only: SWA bounded replay; see Request.replay_start.
    replay_start: int = 0
""",
        """    # DeepSeek-V4.1 only: SWA bounded replay; see Request.replay_start.
    replay_start: int = 0
    # A streaming continuation: prompt_token_ids holds the prompt from this
    # index on; the worker holds the tokens before it (its last prompt and the
    # tokens it sampled), so a chunk costs its own length, not the session's.
    prompt_start: int = 0
""",
    ), (
        "v1/core/sched/scheduler.py",
        """        num_computed_tokens = session.num_computed_tokens
        kept_output_tokens = session._all_token_ids[
""",
        """        num_computed_tokens = session.num_computed_tokens
        # The worker holds these tokens: the next prompt goes to it from here.
        session.prompt_start_for_worker = num_computed_tokens
        kept_output_tokens = session._all_token_ids[
""",
    ), (
        "v1/core/sched/scheduler.py",
        """            new_reqs_data = [
                NewRequestData.from_request(
                    req,
                    req_to_new_blocks[req.request_id].get_block_ids(),
                    uses_mrope=self.model_uses_mrope,
                )
                for req in scheduled_new_reqs
            ]
""",
        """            new_reqs_data = [
                NewRequestData.from_request(
                    req,
                    req_to_new_blocks[req.request_id].get_block_ids(),
                    uses_mrope=self.model_uses_mrope,
                )
                for req in scheduled_new_reqs
            ]
            if not self.scheduler_config.async_scheduling:
                for data, req in zip(new_reqs_data, scheduled_new_reqs):
                    if start := req.__dict__.pop("prompt_start_for_worker", 0):
                        data.prompt_token_ids = req.prompt_token_ids[start:]
                        data.prompt_start = start
""",
    )],
    "patch_metrics_loggers": [(
        "v1/engine/async_llm.py",
        """        custom_stat_loggers.extend(load_stat_logger_plugin_factories())
""",
        """        # A plugin logger may serve only some engines (e.g. those that select
        # its attention backend); one that declines does not turn stats on.
        custom_stat_loggers.extend(
            factory
            for factory in load_stat_logger_plugin_factories()
            if not hasattr(factory, "serves") or factory.serves(vllm_config)
        )
""",
    ), (
        "v1/metrics/loggers.py",
        """        custom_prometheus_logger: bool = False
        for stat_logger_factory in stat_logger_factories:
""",
        """        # vLLM's Prometheus logger first: it unregisters every `vllm:` collector,
        # so a plugin logger that adds `vllm:` series must come after it.
        custom_prometheus_logger = any(
            isinstance(factory, type) and issubclass(factory, PrometheusStatLogger)
            for factory in stat_logger_factories
        )
        if not custom_prometheus_logger:
            self.stat_loggers.append(
                PrometheusStatLogger(vllm_config, self.engine_indexes)
            )
        for stat_logger_factory in stat_logger_factories:
""",
    ), (
        "v1/metrics/loggers.py",
        """                    engine_indexes=self.engine_indexes,
                )
                if isinstance(global_stat_logger, PrometheusStatLogger):
                    custom_prometheus_logger = True
            else:
""",
        """                    engine_indexes=self.engine_indexes,
                )
            else:
""",
    ), (
        "v1/metrics/loggers.py",
        """            self.stat_loggers.append(global_stat_logger)
        if not custom_prometheus_logger:
            self.stat_loggers.append(
                PrometheusStatLogger(vllm_config, self.engine_indexes)
            )
""",
        """            self.stat_loggers.append(global_stat_logger)
""",
    )],
}


def vllm_root() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("vllm").submodule_search_locations[0])


def make_diff(name: str, root: Path) -> str:
    by_file: dict[str, str] = {}
    for rel, old, new in EDITS[name]:
        text = by_file.get(rel) or (root / rel).read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{name}: the text to change in vllm/{rel} is not there exactly once")
        by_file[rel] = text.replace(old, new)
    chunks = []
    for rel, new_text in by_file.items():
        old_text = (root / rel).read_text()
        chunks += difflib.unified_diff(
            old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
            fromfile=f"a/vllm/{rel}", tofile=f"b/vllm/{rel}",
        )  # fmt: skip
    return "".join(chunks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if a committed diff differs")
    args = parser.parse_args()
    root, stale = vllm_root(), []
    for name in EDITS:
        path = HERE / f"{name}.diff"
        diff = make_diff(name, root)
        if args.check:
            if not path.exists() or path.read_text() != diff:
                stale.append(path.name)
        else:
            path.write_text(diff)
    if stale:
        print("stale or missing:", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
