"""lminf's series on vLLM's Prometheus `/metrics` (docs/serving.md, "Metrics").

Where the numbers arise and how they reach the front-end's registry:

  worker         the metadata builder adds each step's `Plan.rows_served`
                 (query rows per way) to this process's tally (`counted`),
                 and a top-k plan's `host_store_bytes` replaces the last;
                 the worker sends the tally with the step's ModelRunnerOutput
                 (patch_worker_gpu_worker)
  engine core    the scheduler keeps the latest tally it received, and its
                 `make_stats` (patch_core_sched_scheduler) puts
                 `engine_snapshot()` on the step's SchedulerStats, in a field
                 vLLM's stats lack (patch_metrics_stats): cumulative blocks
                 freed and rows per way, blocks held now
  front-end      vLLM's StatLoggerManager (patch_metrics_loggers) hands each
                 step's SchedulerStats to a stat logger whose `LminfSeries` moves
                 prometheus_client counters and a gauge in vLLM's registry

Workers and the engine core send totals, not increments: a message that
never arrives loses nothing. With tensor parallelism every worker counts the
same rows; the scheduler hears from the one whose output vLLM uses.
Only engines that select lminf have these series. No vLLM import here:
the vLLM-facing pieces are the four patches and the builder (backend.py).
"""

import threading
from collections import Counter
from typing import Any, Iterable

from lminf_vllm.block_policy import global_blocks

SNAPSHOT_FIELD = "lminf_stats"  # the SchedulerStats field (patch_metrics_stats)
FREED = "kv_blocks_freed"
HELD = "kv_blocks_held"
ROWS = "rows:"  # ROWS + way, e.g. "rows:cpu_kernel plain"
ROWS_ATTR = "lminf_rows"  # on a worker's ModelRunnerOutput (patch_worker_gpu_worker)
HOST_STORE = "topk_host_store_bytes"  # in the worker's tally and the snapshot: a level, not a count

_rows: Counter = Counter()
_levels: dict[str, int] = {}
_lock = threading.Lock()
_paused = False


def counted(plan):
    """Add a step's `plan.rows_served` to this process's tally; returns the plan (once per step)."""
    if not _paused:
        with _lock:
            _rows.update(plan.rows_served)
            if (held := getattr(plan, "host_store_bytes", None)) is not None:
                _levels[HOST_STORE] = held
    return plan


def uncounted(build, *args):
    """build(*args) without counting: CUDA-graph capture builds dummy batches, not served rows."""
    global _paused
    _paused = True
    try:
        return build(*args)
    finally:
        _paused = False


def rows_tally() -> dict[str, int]:
    """Rows per way so far, and the latest levels (HOST_STORE)."""
    with _lock:
        return {**_rows, **_levels}


def held_blocks(blocks: list, first_gap_block: int) -> int:
    """Blocks a sequence holds: its global blocks, and the run of real blocks at the
    end (the window and what is being filled); freed ones are vLLM's null block.
    Reads O(G/B + W/B) entries, not the whole table (nor a copy of it: a list slice
    of a 10M-token session's blocks would be one)."""
    held = sum(not b.is_null for b in blocks[:first_gap_block])
    for k in range(len(blocks) - 1, first_gap_block - 1, -1):
        if blocks[k].is_null:
            break
        held += 1
    return held


def engine_snapshot(managers: Iterable[Any], rows: dict[str, int]) -> dict[str, int]:
    """What the engine core sends each step: from its LminfManagers (one per KV cache
    group) and the latest rows tally a worker sent."""
    freed, per_request = 0, Counter()
    for m in managers:
        freed += m.num_freed_blocks
        first_gap = global_blocks(m.global_tokens, m.block_size)
        for request_id, blocks in m.req_to_blocks.items():
            per_request[request_id] += held_blocks(blocks, first_gap)
    snapshot = {FREED: freed, HELD: max(per_request.values(), default=0)}
    snapshot.update({(way if way == HOST_STORE else ROWS + way): n for way, n in rows.items()})
    return snapshot


class LminfSeries:
    """The series in the front-end's prometheus_client registry, moved by engine-core snapshots."""

    def __init__(self, model_name: str, engine_indexes: list[int], topk: bool = False) -> None:
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Gauge

        labels = ["model_name", "engine"]
        self.model_name = model_name
        self.freed = PromCounter(
            name="vllm:lminf_kv_blocks_freed",
            documentation="KV blocks lminf freed from the middle of running sequences "
            "(between the global blocks and the window).",
            labelnames=labels,
        )
        self.held = Gauge(
            name="vllm:lminf_kv_blocks_held",
            documentation="KV blocks held by the running sequence that holds the most "
            "(lminf's per-sequence bound caps it; 0 when none runs).",
            multiprocess_mode="mostrecent",
            labelnames=labels,
        )
        self.rows = PromCounter(
            name="vllm:lminf_attention_rows",
            documentation="Query rows lminf attention served, by the way that served them.",
            labelnames=[*labels, "path"],
        )
        self.host_store = Gauge(
            name="vllm:lminf_topk_host_store_bytes",
            documentation="Host memory the top-k store holds (one copy of every stored block's keys and values, "
            "and its summaries, in whole chunks), as the last step left it: a request's blocks go the step after "
            "it ends, or when it is preempted.",
            multiprocess_mode="mostrecent",
            labelnames=labels,
        ) if topk else None  # fmt: skip
        for engine in engine_indexes:  # the block series show from start-up
            self.freed.labels(model_name, str(engine))
            self.held.labels(model_name, str(engine)).set(0)
            if self.host_store is not None:
                self.host_store.labels(model_name, str(engine)).set(0)
        self.last: dict[int, dict[str, int]] = {}

    def record(self, snapshot: dict[str, int], engine_idx: int = 0) -> None:
        values = [self.model_name, str(engine_idx)]
        last = self.last.setdefault(engine_idx, {})
        for key, total in snapshot.items():
            if key == HELD:
                self.held.labels(*values).set(total)
                continue
            if key == HOST_STORE:
                if self.host_store is not None:
                    self.host_store.labels(*values).set(total)
                continue
            before = last.get(key, 0)
            step = total - before if total >= before else total  # an engine core that restarted counts from 0
            last[key] = total
            if key == FREED:
                metric = self.freed.labels(*values)
            elif key.startswith(ROWS):
                metric = self.rows.labels(*values, key[len(ROWS):])
            else:
                continue
            if step:
                metric.inc(step)  # a way first seen with 0 rows still gets its series
