"""Put lminf's engine-core counts on each step's scheduler stats.

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
Upstream: `make_plugin_stats()` on each KV cache manager, merged into
    SchedulerStats by the scheduler; LminfManager's would return the snapshot
    (the rows tally included: the builder runs in that process).
Remove when: vLLM has such a hook.
"""

from lminf_vllm.metrics import ROWS_ATTR, SNAPSHOT_FIELD, engine_snapshot
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
            return original(self, scheduler_output, model_runner_output, *args, **kwargs)

        return update_from_output

    applied = replace_attr(Scheduler, "make_stats", make)
    return replace_attr(Scheduler, "update_from_output", make_update) or applied


def is_applied() -> bool:
    from vllm.v1.core.sched.scheduler import Scheduler

    return is_patched(Scheduler, "make_stats") and is_patched(Scheduler, "update_from_output")
