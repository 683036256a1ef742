"""Send the worker's attention-row counts to the scheduler with each step's output.

Target: vllm.v1.worker.gpu_worker.Worker.execute_model and .sample_tokens
Why: lminf's builder counts the rows each attention path served in the worker,
    and on CPU the worker is a process of its own even at tensor parallel 1
    (vLLM's CPU platform picks the multiprocessing executor whenever
    VLLM_ENABLE_V1_MULTIPROCESSING is on, the default). The one thing a worker
    sends the scheduler each step is its ModelRunnerOutput (pickled by the
    multiprocessing and Ray executors, handed over as is by the in-process one);
    it has no field for a backend's counts.
How: a ModelRunnerOutput with requests in it (CPUWorker inherits both methods;
    an AsyncModelRunnerOutput's `get_output` is wrapped) gets the attribute
    `lminf_rows`: the worker's cumulative `lminf_vllm.metrics.rows_tally()`.
    patch_core_sched_scheduler reads it. A worker that never built an lminf
    step has an empty tally and attaches nothing.
Upstream: a `backend_stats: dict[str, int] | None` field on ModelRunnerOutput
    that attention metadata builders may fill, merged into SchedulerStats by
    the scheduler.
Remove when: ModelRunnerOutput carries such a field.
"""

from lminf_vllm.metrics import ROWS_ATTR, rows_tally
from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.v1.worker.gpu_worker.Worker.execute_model"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES


def with_rows(output):
    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

    if isinstance(output, ModelRunnerOutput):
        if output.req_ids and (rows := rows_tally()):  # never the shared empty output
            setattr(output, ROWS_ATTR, rows)
    elif isinstance(output, AsyncModelRunnerOutput) and rows_tally():
        get_output = output.get_output
        output.get_output = lambda: with_rows(get_output())
    return output


def apply() -> bool:
    from vllm.v1.worker.gpu_worker import Worker

    def make(original):
        def method(self, *args, **kwargs):
            return with_rows(original(self, *args, **kwargs))

        method.__name__ = original.__name__
        return method

    applied = replace_attr(Worker, "execute_model", make)
    return replace_attr(Worker, "sample_tokens", make) or applied


def is_applied() -> bool:
    from vllm.v1.worker.gpu_worker import Worker

    return is_patched(Worker, "execute_model") and is_patched(Worker, "sample_tokens")
