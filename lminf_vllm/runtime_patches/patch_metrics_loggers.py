"""Export lminf's series through vLLM's Prometheus registry, for lminf engines only.

Target: vllm.v1.metrics.loggers.StatLoggerManager.__init__
Why: the front-end's stat loggers get every step's SchedulerStats, and vLLM's
    `/metrics` serves the prometheus_client registry they write to. vLLM's
    stat-logger plugin entry-point group would add a logger to every engine,
    stock ones included, and turn stats on in engines started with
    `--disable-log-stats`; and the PrometheusStatLogger vLLM builds after the
    plugin loggers unregisters every `vllm:` collector made before it.
How: after vLLM's __init__ (its PrometheusStatLogger already built), an engine
    that selects lminf and logs stats gets one more logger, whose
    `lminf_vllm.metrics.LminfSeries` turns each step's `lminf_stats`
    (patch_metrics_stats) into `vllm:lminf_*` counters and gauges, labelled
    like vLLM's own (model_name, engine). Other engines: vLLM's loggers only.
Upstream: a stat-logger plugin may decline an engine (`serves(vllm_config)`
    False) without turning stats on, and vLLM's PrometheusStatLogger is built
    before the plugin loggers.
Remove when: vLLM has both; lminf then registers a stat-logger plugin entry
    point (setup.py) instead.
"""

from lminf_vllm.metrics import SNAPSHOT_FIELD, LminfSeries
from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.v1.metrics.loggers.StatLoggerManager.__init__"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES


def stat_logger(vllm_config, engine_indexes: list[int]):
    """A vLLM AggregateStatLoggerBase that feeds LminfSeries."""
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    class LminfStatLogger(AggregateStatLoggerBase):
        def __init__(self, vllm_config, engine_indexes: list[int]) -> None:
            from lminf_vllm.vllm_config import lminf_config_from_vllm

            topk = lminf_config_from_vllm(vllm_config).topk_blocks > 0  # (the host store's gauge)
            self.series = LminfSeries(vllm_config.model_config.served_model_name, engine_indexes, topk)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            snapshot = getattr(scheduler_stats, SNAPSHOT_FIELD, None)
            if snapshot:
                self.series.record(snapshot, engine_idx)

        def log_engine_initialized(self) -> None:
            pass

    return LminfStatLogger(vllm_config, engine_indexes)


def apply() -> bool:
    from vllm.v1.metrics.loggers import StatLoggerManager

    def make(original):
        def __init__(self, vllm_config, *args, **kwargs):
            original(self, vllm_config, *args, **kwargs)
            from lminf_vllm.vllm_config import is_lminf_selected

            if is_lminf_selected(vllm_config):
                self.stat_loggers.append(stat_logger(vllm_config, self.engine_indexes))

        return __init__

    return replace_attr(StatLoggerManager, "__init__", make)


def is_applied() -> bool:
    from vllm.v1.metrics.loggers import StatLoggerManager

    return is_patched(StatLoggerManager, "__init__")
