"""Seeded sampling with chunked prefill on CPU: rewind the generator by state.

Target: vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample and ._bookkeeping_sync
Why: a request with a `seed` gets its own torch.Generator. While its prompt is
    prefilled in chunks, each partial step samples a token that is thrown away,
    and vLLM rewinds the generator with `gen.set_offset(gen.get_offset() - 4)`.
    CPU generators have no offset ("CPU Generator does not use offset"): the
    worker raises and the whole engine dies, taking every request with it. Long
    prompts (lminf's use case) are chunked all the time, so on CPU one seeded
    request was enough to kill a server (seen in benchmarks/soak.py).
How: before sampling, snapshot the state of the CPU generators of requests
    whose sample will be discarded; in the bookkeeping step restore those
    states (the same rewind, by state instead of offset) and hide those
    generators from vLLM's offset rewind. CUDA generators are left to vLLM.
    Only in engines that select lminf: a stock engine in the same environment
    keeps vLLM's behaviour unless its user opts in with LMINF_SEEDED_SAMPLING_FIX=1
    (read when the engine's model runner first samples).
Upstream: rewind CPU generators by state in `_bookkeeping_sync` (or make the
    sampler not draw for discarded rows).
Remove when: vLLM handles CPU generators there.

Target 2: GPUModelRunner._update_states, ._build_attention_metadata and ._dummy_run
Why: the top-k path (topk_blocks > 0) keeps each request's middle blocks in a
    host store keyed by request id, and must forget a request when it ends or
    is preempted (it is computed again from its first token on resume);
    CommonAttentionMetadata carries neither the ids nor those requests. A
    top-k step without ids would silently lose its middle blocks, so the
    builder must also tell a real step from a dummy one.
How: in lminf engines, collect scheduler_output.finished_req_ids and
    .preempted_req_ids; while a real step's attention metadata is built (the
    call that passes num_scheduled_tokens) publish the batch's request ids
    (input_batch order, the block table's rows) and those requests
    (step.publish_requests); while _dummy_run builds one, publish a dummy run;
    clear both when the build returns. The metadata builder reads them into
    StepBatch; a top-k step that finds neither stops with an error.
Upstream: request ids on CommonAttentionMetadata, a dummy-run flag on it (and
    an end-of-request hook for attention backends).
Remove when: vLLM passes them.

Target 3: GPUModelRunner._update_streaming_request
Why: each chunk of a streaming session brought the session's whole prompt
    from the scheduler and handed it to the input batch to write again: a cost
    per chunk that grew with the session (docs/sessions.md).
How: in lminf engines the scheduler sends a streaming session's next prompt as
    the tokens the worker lacks (lminf_vllm.streaming_tail.TokenTail, see
    patch_core_sched_scheduler); here the worker's copy is extended in place to
    the whole prompt (streaming_tail.rebuild, which checks the tokens where the
    two meet) before vLLM's update runs, and the input batch is told how much
    of the request's row already holds it (patch_worker_gpu_input_batch).
Upstream: NewRequestData for a streaming continuation carrying only the new
    tokens; the runner extends its state and the batch row.
Remove when: vLLM does so.
"""

import logging
import os

import numpy as np

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES
_SNAPSHOTS = "_lminf_cpu_rng_snapshots"
_ENABLED = "_lminf_seeded_sampling_fix"
_FINISHED = "_lminf_finished_requests"  # ended or preempted since the last step's metadata (None: not lminf)
_IN_DUMMY_RUN = "_lminf_in_dummy_run"
OPT_IN_ENV = "LMINF_SEEDED_SAMPLING_FIX"
logger = logging.getLogger("vllm.lminf")  # under "vllm" so vLLM's log setup shows it
_told = []  # whether this process has logged its first rebuilt streaming prompt


def enabled(runner) -> bool:
    """Whether this runner's engine gets the fix: it selects lminf, or its user opted in."""
    decided = getattr(runner, _ENABLED, None)
    if decided is None:
        from lminf_vllm.vllm_config import is_lminf_selected

        decided = os.environ.get(OPT_IN_ENV) == "1" or is_lminf_selected(runner.vllm_config)
        setattr(runner, _ENABLED, decided)
    return decided


def is_lminf_engine(runner) -> bool:
    """Whether this runner's engine selects lminf (decided once per runner)."""
    if not hasattr(runner, _FINISHED):
        from lminf_vllm.vllm_config import is_lminf_selected

        setattr(runner, _FINISHED, set() if is_lminf_selected(runner.vllm_config) else None)
    return getattr(runner, _FINISHED) is not None


def _discarded_cpu_generators(runner) -> dict:
    num_reqs = runner.input_batch.num_reqs
    indices = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    gens = {int(i): runner.input_batch.generators.get(int(i)) for i in indices}
    return {i: g for i, g in gens.items() if g is not None and g.device.type == "cpu"}


def apply() -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make_sample(original):
        def _sample(self, logits, spec_decode_metadata):
            if not enabled(self):
                return original(self, logits, spec_decode_metadata)
            setattr(self, _SNAPSHOTS, {i: g.get_state() for i, g in _discarded_cpu_generators(self).items()})
            return original(self, logits, spec_decode_metadata)

        return _sample

    def make_bookkeeping(original):
        def _bookkeeping_sync(self, *args, **kwargs):
            snapshots = getattr(self, _SNAPSHOTS, None) or {}
            setattr(self, _SNAPSHOTS, None)
            generators = self.input_batch.generators
            hidden = {}
            for i, state in snapshots.items():
                gen = generators.get(i)
                if gen is not None and gen.device.type == "cpu":
                    gen.set_state(state)  # the rewind
                    hidden[i] = generators.pop(i)  # vLLM's offset rewind would raise on it
            try:
                return original(self, *args, **kwargs)
            finally:
                generators.update(hidden)

        return _bookkeeping_sync

    def make_update_states(original):
        def _update_states(self, scheduler_output):
            if is_lminf_engine(self):
                gone = getattr(self, _FINISHED)
                gone.update(scheduler_output.finished_req_ids)
                gone.update(scheduler_output.preempted_req_ids or ())  # recomputed from token 0 on resume
            return original(self, scheduler_output)

        return _update_states

    def make_build_attention_metadata(original):
        def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
            if not is_lminf_engine(self):
                return original(self, num_tokens, num_reqs, *args, **kwargs)
            from lminf_vllm.step import clear_published, publish_dummy_run, publish_requests

            # Only real steps pass num_scheduled_tokens: a dummy run's input_batch may still hold the last step's.
            if kwargs.get("num_scheduled_tokens") is not None:
                publish_requests(self.input_batch.req_ids[:num_reqs], getattr(self, _FINISHED))
                getattr(self, _FINISHED).clear()
            elif getattr(self, _IN_DUMMY_RUN, False):
                publish_dummy_run()
            else:  # a caller we do not know: the builder says so where it needs ids
                clear_published()
            try:
                return original(self, num_tokens, num_reqs, *args, **kwargs)
            finally:
                clear_published()

        return _build_attention_metadata

    def make_dummy_run(original):
        def _dummy_run(self, *args, **kwargs):
            if not is_lminf_engine(self):
                return original(self, *args, **kwargs)
            setattr(self, _IN_DUMMY_RUN, True)
            try:
                return original(self, *args, **kwargs)
            finally:
                setattr(self, _IN_DUMMY_RUN, False)

        return _dummy_run

    def make_update_streaming(original):
        def _update_streaming_request(self, req_id, new_req_data):
            from lminf_vllm.streaming_tail import TokenTail, rebuild

            tail = new_req_data.prompt_token_ids
            if not isinstance(tail, TokenTail):
                return original(self, req_id, new_req_data)
            from lminf_vllm.runtime_patches.patch_worker_gpu_input_batch import keep_row_prefix

            state = self.requests[req_id]
            new_req_data.prompt_token_ids = rebuild(state.prompt_token_ids, state.output_token_ids, tail, req_id)
            if not _told:
                _told.append(req_id)
                logger.info("lminf: streaming session %r: its next chunks reach the worker as their new tokens only", req_id)
            row = self.input_batch.req_id_to_index.get(req_id)  # None: it left the batch in an earlier step
            req_state = original(self, req_id, new_req_data)
            if row is not None:
                keep_row_prefix(self.input_batch, req_id, row, tail.start)
            return req_state

        return _update_streaming_request

    applied = replace_attr(GPUModelRunner, "_sample", make_sample)
    replace_attr(GPUModelRunner, "_bookkeeping_sync", make_bookkeeping)
    replace_attr(GPUModelRunner, "_update_states", make_update_states)
    replace_attr(GPUModelRunner, "_build_attention_metadata", make_build_attention_metadata)
    replace_attr(GPUModelRunner, "_dummy_run", make_dummy_run)
    replace_attr(GPUModelRunner, "_update_streaming_request", make_update_streaming)
    return applied


def is_applied() -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    names = ("_sample", "_bookkeeping_sync", "_update_states", "_build_attention_metadata", "_dummy_run",
             "_update_streaming_request")
    return all(is_patched(GPUModelRunner, name) for name in names)
