"""A log line every few seconds while a long prompt is prefilled, so a server is visibly alive.

vLLM's stats line counts a prompt's tokens only when its prefill ends (its first
token), and after 20 s without counted tokens it takes the engine for idle and
stops writing: a 13,789-token prompt on a slow CPU left the server's log silent
for minutes. The scheduler (patch_core_sched_scheduler) hands this tracker its
running requests after each step; it writes, per request still prefilling, how
far it is and at what rate, at most once per interval. No vLLM import: requests
are anything with request_id, num_computed_tokens and num_prompt_tokens.
"""

import logging
import time

logger = logging.getLogger("vllm.lminf")

INTERVAL_S = 10.0  # vLLM's own stats interval (VLLM_LOG_STATS_INTERVAL's default)


class PrefillProgress:
    def __init__(self, interval_s: float | None = None, clock=time.monotonic):
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.clock = clock
        self._seen: dict[str, tuple[float, int, float]] = {}  # id -> (first seen, tokens then, last line)

    def after_step(self, requests) -> list[str]:
        """Call with the running requests after each step; returns the lines it logged."""
        now, lines, prefilling = self.clock(), [], set()
        for r in requests:
            done, total = r.num_computed_tokens, r.num_prompt_tokens
            if done >= total:
                continue
            prefilling.add(r.request_id)
            start, done0, last = self._seen.setdefault(r.request_id, (now, done, now))
            if done < done0:  # preempted and started again: measure the rate from here
                start, done0, last = self._seen[r.request_id] = (now, done, now)
            if now - last < self.interval_s:
                continue
            self._seen[r.request_id] = (start, done0, now)
            rate = (done - done0) / max(now - start, 1e-9)
            left = f", the rest in about {(total - done) / rate:.0f} s" if rate > 0 else ""
            lines.append(f"lminf: request {r.request_id} is prefilling its prompt: {done:,} of {total:,} "
                         f"tokens computed ({rate:,.0f} tokens/s{left})")  # fmt: skip
        for gone in set(self._seen) - prefilling:
            del self._seen[gone]
        for line in lines:
            logger.info(line)
        return lines
