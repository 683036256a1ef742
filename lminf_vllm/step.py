"""What the attention paths are handed: the engine's shape, one step's batch, one layer's math.

Plain dataclasses, no vLLM import: `backend.py` fills them from vLLM's types.
"""

from dataclasses import dataclass

import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.rope import RotarySpec


@dataclass(frozen=True)
class EngineShape:
    """What is fixed for an engine's lminf layers."""

    cfg: LminfConfig
    device_type: str  # "cpu", "cuda", ...
    block_size: int
    num_heads: int  # query heads per rank
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype  # of the KV cache
    rope: bool  # False: ALiBi (no rotary embedding)


@dataclass
class StepBatch:
    """One step's batch: the fields of vLLM's CommonAttentionMetadata the paths read."""

    num_tokens: int  # tokens with a query this step (the tensors may be padded past it)
    num_reqs: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, on the device
    query_start_loc_cpu: torch.Tensor  # the same, on the host
    seq_lens: torch.Tensor  # [num_reqs] int32: tokens computed after the step, on the device
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [>= num_tokens] flat cache slot of each token (< 0: padding)
    max_query_len: int
    max_seq_len: int
    request_ids: tuple[str, ...] | None = None  # vLLM's id of each request (None: not known, e.g. a dummy run)
    finished: frozenset[str] = frozenset()  # requests that ended since the last step

    def requests(self) -> list[tuple[int, int, int, int]]:
        """(request, first token, query count, seq_len after the step) per request: host work."""
        starts = self.query_start_loc_cpu[: self.num_reqs + 1].tolist()
        lens = self.seq_lens[: self.num_reqs].cpu().tolist()
        return [(r, starts[r], starts[r + 1] - starts[r], lens[r]) for r in range(self.num_reqs)]


# The model runner publishes which requests a step's batch holds (and which
# ended) just before it builds the step's attention metadata
# (runtime_patches/patch_worker_gpu_model_runner.py); the builder reads them.
_published: dict = {"ids": None, "finished": frozenset()}


def publish_requests(request_ids, finished) -> None:
    _published["ids"] = tuple(request_ids)
    _published["finished"] = _published["finished"] | frozenset(finished)


def take_published_requests(num_reqs: int) -> dict:
    """StepBatch's request_ids and finished for a batch of num_reqs requests (taken once)."""
    ids, finished = _published["ids"], _published["finished"]
    _published["ids"], _published["finished"] = None, frozenset()
    return {"request_ids": ids if ids is not None and len(ids) == num_reqs else None, "finished": finished}


@dataclass
class LayerMath:
    """What one attention layer adds to the step's plan."""

    scale: float
    rotary: RotarySpec | None  # None for ALiBi models
    alibi: torch.Tensor | None  # [H] slopes of the bias -m * d
    inv_freq: torch.Tensor | None = None  # rotary.inv_freq (float64) on the query's device

    @classmethod
    def on_device(cls, scale: float, rotary: RotarySpec | None, alibi_slopes, device) -> "LayerMath":
        if rotary is None and alibi_slopes is None:
            raise RuntimeError("lminf attention layer was never bound to its rotary embedding; "
                               "the model loader patch did not run")  # fmt: skip
        alibi = None if alibi_slopes is None else torch.tensor(alibi_slopes, dtype=torch.float32, device=device)
        inv_freq = None if rotary is None else rotary.inv_freq.to(device, torch.float64)
        return cls(scale, rotary, alibi, inv_freq)
