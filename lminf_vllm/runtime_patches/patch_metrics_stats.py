"""Give vLLM's per-step scheduler stats a field for lminf's counts.

Target: vllm.v1.metrics.stats.SchedulerStats
Why: lminf's KV manager and attention run in the engine-core process, the
    Prometheus registry behind `/metrics` in the front-end. vLLM's channel from
    one to the other is SchedulerStats, sent with every step's outputs (msgspec,
    by the dataclass's declared fields) and handed to the front-end's stat
    loggers; it has no field a plugin may fill, and the decoder drops any
    attribute that is not a declared field.
How: declares one more dataclass field, `lminf_stats: dict[str, int] | None`,
    default None, not an `__init__` argument (vLLM's constructor is unchanged),
    before the first stats message is encoded or decoded (plugins load first in
    every process). Stock engines leave it None: a nil on the wire.
    patch_core_sched_scheduler fills it; patch_metrics_loggers reads it.
Upstream: a `plugin_stats: dict[str, Any] | None` field on SchedulerStats
    that schedulers and KV managers may fill and stat-logger plugins read.
Remove when: SchedulerStats carries such a field.
"""

import dataclasses

from lminf_vllm.metrics import SNAPSHOT_FIELD
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.v1.metrics.stats.SchedulerStats"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES


@dataclasses.dataclass
class _Declared:  # the field as the dataclass machinery makes it
    lminf_stats: dict[str, int] | None = dataclasses.field(default=None, init=False)


def apply() -> bool:
    from vllm.v1.metrics.stats import SchedulerStats

    if SNAPSHOT_FIELD in SchedulerStats.__dataclass_fields__:
        return False
    (field,) = dataclasses.fields(_Declared)
    SchedulerStats.__dataclass_fields__[SNAPSHOT_FIELD] = field
    SchedulerStats.__annotations__[SNAPSHOT_FIELD] = field.type
    setattr(SchedulerStats, SNAPSHOT_FIELD, None)
    return True


def is_applied() -> bool:
    from vllm.v1.metrics.stats import SchedulerStats

    return SNAPSHOT_FIELD in SchedulerStats.__dataclass_fields__
