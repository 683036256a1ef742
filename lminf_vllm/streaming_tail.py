"""A streaming session's next prompt, sent to the worker as the tokens it lacks.

For each chunk of a vLLM streaming-input session the scheduler sends the worker
the session's whole prompt (pickled through the executor's queue), and the
worker writes all of it into its token row: per chunk a cost that grows with
the session, about 40 ns a token (0.4 s a chunk at 10M tokens). The worker
already holds every token but the new chunk's: its copy of the prompt and the
tokens it sampled. So the scheduler sends `TokenTail` (the prompt from `start`
on, with the few tokens before `start` to check against) and the worker
rebuilds the prompt in place (`rebuild`): a chunk then costs its own length.
No vLLM import: the scheduler and runner patches apply it.
"""

CHECK = 4  # tokens before the tail that the worker's copy must match


class TailMismatch(RuntimeError):
    pass


class TokenTail(list):
    """prompt[start:] of a prompt `length` tokens long; `before` is prompt[start - CHECK:start]."""

    def __init__(self, tokens, start: int, length: int, before: list[int]):
        super().__init__(tokens)
        self.start, self.length, self.before = start, length, before

    def __reduce__(self):  # a list subclass pickles its items and the fields, no more
        return TokenTail, (list(self), self.start, self.length, self.before)


def tail_of(prompt: list[int], start: int) -> TokenTail:
    """What to send in place of `prompt` to a worker that holds its first `start` tokens."""
    return TokenTail(prompt[start:], start, len(prompt), prompt[max(start - CHECK, 0) : start])


def rebuild(prompt: list[int], sampled: list[int], tail: TokenTail, request_id: str) -> list[int]:
    """The whole prompt from the worker's copy of the last one (`prompt`, extended in place)
    and of the tokens it sampled since. An in-process executor shares the scheduler's list,
    which the scheduler has already extended: then it is returned as it is."""
    if len(prompt) == tail.length:
        return prompt
    need = tail.start - len(prompt)  # the sampled tokens the session kept (its last one is dropped)
    have = prompt[max(tail.start - CHECK, 0) :] + sampled[: max(need, 0)]
    if not 0 <= need <= len(sampled) or have[len(have) - len(tail.before) :] != tail.before:
        raise TailMismatch(
            f"lminf: streaming session {request_id!r}: the worker holds {len(prompt)} prompt and "
            f"{len(sampled)} sampled tokens, which do not end in the scheduler's first {tail.start}; "
            "cannot rebuild its prompt from the new tokens alone (report this as a bug)"
        )
    prompt.extend(sampled[:need])
    prompt.extend(tail)
    return prompt
