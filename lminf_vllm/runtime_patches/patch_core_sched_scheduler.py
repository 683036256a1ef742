"""Put lminf's engine-core counts on each step's scheduler stats, and log long prefills' progress.

Target: vllm.v1.core.sched.scheduler.Scheduler.make_stats and .update_from_output
Why: the blocks lminf frees and holds are known to its KV managers, inside the
    scheduler, and the rows each attention path served to the worker's builder,
    which sends them with its output (patch_worker_gpu_worker); the front-end's
    `/metrics` sees neither (see patch_metrics_stats).
How: update_from_output keeps the rows tally a ModelRunnerOutput brings (per
    way, the largest total seen: totals only grow). After vLLM's make_stats
    (None when stats are off), an engine whose KV cache groups include lminf's
    manager sets `lminf_stats = lminf_vllm.metrics.engine_snapshot(...)`:
    cumulative blocks freed and rows per way, and blocks held now. Reads
    O(G/B + W/B) blocks per running sequence; the managers are found once per
    scheduler. Other engines' stats are vLLM's own.
    After each step of an lminf engine, update_from_output also hands the running
    requests to lminf_vllm.prefill_progress, which logs a line every 10 s for a
    prompt still being prefilled (vLLM's stats line counts a prompt only once it
    is done, so a long prefill left the server's log silent for minutes).
Upstream: `make_plugin_stats()` on each KV cache manager, merged into
    SchedulerStats by the scheduler; LminfManager's would return the snapshot
    (the rows tally included: the builder runs in that process); prompt tokens
    counted per computed chunk in vLLM's iteration stats, for the progress.
Remove when: vLLM has such a hook.
"""

from lminf_vllm.metrics import ROWS_ATTR, SNAPSHOT_FIELD, engine_snapshot
from lminf_vllm.prefill_progress import PrefillProgress
from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.v1.core.sched.scheduler.Scheduler.make_stats"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES


def lminf_managers(scheduler) -> tuple:
    managers = scheduler.__dict__.get("_lminf_managers")
    if managers is None:
        from lminf_vllm.kv_cache import LminfManager

        coordinator = getattr(scheduler.kv_cache_manager, "coordinator", None)
        found = getattr(coordinator, "single_type_managers", ())
        managers = scheduler._lminf_managers = tuple(m for m in found if isinstance(m, LminfManager))
    return managers


def apply() -> bool:
    from vllm.v1.core.sched.scheduler import Scheduler

    def make(original):
        def make_stats(self, *args, **kwargs):
            stats = original(self, *args, **kwargs)
            if stats is not None and (managers := lminf_managers(self)):
                rows = self.__dict__.get("_lminf_rows", {})
                setattr(stats, SNAPSHOT_FIELD, engine_snapshot(managers, rows))
            return stats

        return make_stats

    def make_update(original):
        def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
            if sent := getattr(model_runner_output, ROWS_ATTR, None):
                rows = self.__dict__.setdefault("_lminf_rows", {})
                for way, total in sent.items():
                    rows[way] = max(rows.get(way, 0), total)
            outputs = original(self, scheduler_output, model_runner_output, *args, **kwargs)
            if lminf_managers(self):
                self.__dict__.setdefault("_lminf_prefill_progress", PrefillProgress()).after_step(self.running)
            return outputs

        return update_from_output

    applied = replace_attr(Scheduler, "make_stats", make)
    return replace_attr(Scheduler, "update_from_output", make_update) or applied


def is_applied() -> bool:
    from vllm.v1.core.sched.scheduler import Scheduler

    return is_patched(Scheduler, "make_stats") and is_patched(Scheduler, "update_from_output")
