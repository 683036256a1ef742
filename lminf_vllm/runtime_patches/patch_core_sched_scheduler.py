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
"""

from lminf_vllm.metrics import ROWS_ATTR, SNAPSHOT_FIELD, engine_snapshot
from lminf_vllm.prefill_progress import PrefillProgress
from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.streaming_tail import tail_of
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
            output = original(self, *args, **kwargs)
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
