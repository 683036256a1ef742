"""Put lminf's engine-core counts on each step's scheduler stats, log long prefills' progress, send streaming sessions' new tokens only.

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

Target 2: Scheduler._update_request_as_session and .schedule
Why: each chunk of a streaming session sends the worker the session's whole
    prompt (NewRequestData), pickled to the worker process: a cost per chunk
    that grows with the session.
How: in lminf engines whose worker writes its token rows itself (no async
    scheduling, speculative decoding, pipeline parallelism or V2 model runner:
    vLLM's default on CPU), the update notes the tokens the worker already holds
    (the session's computed ones), and the step that schedules the session sends
    the prompt from there on (lminf_vllm.streaming_tail.tail_of); the runner
    patch rebuilds the rest. Other engines, and other requests, send vLLM's.
Upstream: NewRequestData.prompt_start (the worker holds the prompt before it),
    set for a streaming continuation (the diff).
Remove when: vLLM does so.

Target 3: Scheduler.schedule (admission to the top-k host store)
Why: with topk_blocks > 0 and `topk_store_max_bytes` set, the worker's host
    store must stay within the cap; what a request holds there is a pure
    function of its length (paths/topk/store.request_bytes), so the scheduler can
    account it without asking the worker.
How: while vLLM schedules, the KV manager's allocate_slots is wrapped for a
    request that is not running yet (new, or preempted and resuming): if the
    running requests' reservations (each the store bytes of its prompt plus
    max_tokens) and its own exceed the cap, it answers None, which vLLM reads as
    "no KV blocks": the request stays first in the waiting queue, as when the
    pool runs out. A request that could never fit alone was refused at input
    (patch_engine_input_processor); one alone in the engine is let through.
Upstream: a per-request resource hook in admission (e.g. a KV manager method
    `can_admit(request, running)`), for backends with their own memory.
Remove when: vLLM has such a hook.
"""

import logging

from lminf_vllm.metrics import ROWS_ATTR, SNAPSHOT_FIELD, engine_snapshot
from lminf_vllm.prefill_progress import PrefillProgress
from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.streaming_tail import tail_of
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.v1.core.sched.scheduler.Scheduler.make_stats"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES
logger = logging.getLogger("vllm.lminf")  # under "vllm" so vLLM's log setup shows it


def lminf_managers(scheduler) -> tuple:
    managers = scheduler.__dict__.get("_lminf_managers")
    if managers is None:
        from lminf_vllm.kv_cache import LminfManager

        coordinator = getattr(scheduler.kv_cache_manager, "coordinator", None)
        found = getattr(coordinator, "single_type_managers", ())
        managers = scheduler._lminf_managers = tuple(m for m in found if isinstance(m, LminfManager))
    return managers


def sends_tails(scheduler) -> bool:
    """Whether this scheduler sends streaming sessions' next prompts as their new tokens (decided once)."""
    decided = scheduler.__dict__.get("_lminf_sends_tails")
    if decided is None:
        config = scheduler.vllm_config
        decided = scheduler._lminf_sends_tails = bool(
            lminf_managers(scheduler)
            and not config.scheduler_config.async_scheduling
            and config.speculative_config is None
            and config.parallel_config.pipeline_parallel_size == 1
            and not getattr(scheduler, "use_v2_model_runner", False)
        )
    return decided


def topk_store_cap(scheduler) -> int | None:
    """This engine's top-k store cap in bytes per rank, None without one (decided once)."""
    if "_lminf_topk_cap" not in scheduler.__dict__:
        from lminf_vllm.vllm_config import is_lminf_selected, lminf_config_from_vllm

        config = scheduler.vllm_config
        cap = lminf_config_from_vllm(config).topk_store_max_bytes if is_lminf_selected(config) else None
        scheduler._lminf_topk_cap = cap
    return scheduler._lminf_topk_cap


def topk_store_reservation(scheduler, request) -> int:
    """The store bytes a request may come to hold: its prompt plus max_tokens (kept on it)."""
    held = request.__dict__.get("_lminf_topk_reserved")
    if held is None:
        from lminf_vllm.vllm_config import topk_store_bytes

        held = topk_store_bytes(scheduler.vllm_config, request.num_prompt_tokens + request.max_tokens)
        request._lminf_topk_reserved = held
    return held


def _admitting(scheduler, allocate_slots, cap: int):
    def allocate(request, *args, **kwargs):
        running = scheduler.running
        if running and request not in running:  # (alone in the engine it goes: nothing else to wait for)
            held = sum(topk_store_reservation(scheduler, r) for r in running)
            if held + topk_store_reservation(scheduler, request) > cap:
                if not request.__dict__.get("_lminf_held_back"):  # counted once per request (tests, the log)
                    request._lminf_held_back = True
                    scheduler._lminf_held_back = scheduler.__dict__.get("_lminf_held_back", 0) + 1
                    if scheduler._lminf_held_back == 1:
                        logger.info("lminf top-k: request %s waits for room in the host store (running requests "
                                    "reserve %d bytes of topk_store_max_bytes=%d)", request.request_id, held, cap)
                return None
        return allocate_slots(request, *args, **kwargs)

    return allocate


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

    def make_update_session(original):
        def _update_request_as_session(self, session, update):
            if sends_tails(self):
                session._lminf_worker_holds = session.num_computed_tokens
            return original(self, session, update)

        return _update_request_as_session

    def make_schedule(original):
        def schedule(self, *args, **kwargs):
            cap = topk_store_cap(self)
            if cap is None:
                output = original(self, *args, **kwargs)
            else:
                manager = self.kv_cache_manager
                manager.allocate_slots = _admitting(self, manager.allocate_slots, cap)
                try:
                    output = original(self, *args, **kwargs)
                finally:
                    del manager.allocate_slots  # the class's method again
            if sends_tails(self):
                for new in output.scheduled_new_reqs:
                    request = self.requests.get(new.req_id)
                    holds = request.__dict__.pop("_lminf_worker_holds", 0) if request is not None else 0
                    plain = new.prompt_embeds is None and new.prompt_is_token_ids is None
                    if holds and plain and new.prompt_token_ids is not None and holds <= len(new.prompt_token_ids):
                        new.prompt_token_ids = tail_of(new.prompt_token_ids, holds)
            return output

        return schedule

    applied = replace_attr(Scheduler, "make_stats", make)
    applied |= replace_attr(Scheduler, "_update_request_as_session", make_update_session)
    applied |= replace_attr(Scheduler, "schedule", make_schedule)
    return replace_attr(Scheduler, "update_from_output", make_update) or applied


def is_applied() -> bool:
    from vllm.v1.core.sched.scheduler import Scheduler

    names = ("make_stats", "update_from_output", "_update_request_as_session", "schedule")
    return all(is_patched(Scheduler, name) for name in names)
