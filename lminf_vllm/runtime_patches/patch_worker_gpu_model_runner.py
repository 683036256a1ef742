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
"""

import os

import numpy as np

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES
_SNAPSHOTS = "_lminf_cpu_rng_snapshots"
_ENABLED = "_lminf_seeded_sampling_fix"
OPT_IN_ENV = "LMINF_SEEDED_SAMPLING_FIX"


def enabled(runner) -> bool:
    """Whether this runner's engine gets the fix: it selects lminf, or its user opted in."""
    decided = getattr(runner, _ENABLED, None)
    if decided is None:
        from lminf_vllm.vllm_config import is_lminf_selected

        decided = os.environ.get(OPT_IN_ENV) == "1" or is_lminf_selected(runner.vllm_config)
        setattr(runner, _ENABLED, decided)
    return decided


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

    applied = replace_attr(GPUModelRunner, "_sample", make_sample)
    replace_attr(GPUModelRunner, "_bookkeeping_sync", make_bookkeeping)
    return applied


def is_applied() -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return is_patched(GPUModelRunner, "_sample") and is_patched(GPUModelRunner, "_bookkeeping_sync")
