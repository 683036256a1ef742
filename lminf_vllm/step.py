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
    # vLLM's id of each request (the top-k host store's keys): None in a dummy run, or where the runner
    # published none (`missing` says why)
    request_ids: tuple[str, ...] | None = None
    finished: frozenset[str] = frozenset()  # requests that ended (or were preempted) since the last step
    dummy: bool = False  # the runner's dummy or profiling run (start-up, compile warm-up): no real request
    missing: str = ""  # a real step without request ids: why (the top-k path stops with it)

    def requests(self) -> list[tuple[int, int, int, int]]:
        """(request, first token, query count, seq_len after the step) per request: host work."""
        starts = self.query_start_loc_cpu[: self.num_reqs + 1].tolist()
        lens = self.seq_lens[: self.num_reqs].cpu().tolist()
        return [(r, starts[r], starts[r + 1] - starts[r], lens[r]) for r in range(self.num_reqs)]


# The model runner publishes which requests a step's batch holds (and which ended or were
# preempted) while it builds the step's attention metadata, and clears them when done
# (runtime_patches/patch_worker_gpu_model_runner.py); every builder call inside reads them (one per
# KV cache group). A dummy run is published as one. A build the runner did not announce (another
# caller, Model Runner V2, a vLLM that renamed the method) finds nothing: `missing` says so.
_published: dict = {"kind": None, "ids": None, "finished": frozenset()}
NOT_PUBLISHED = (
    "the model runner announced no step for this metadata build: lminf publishes request ids from "
    "GPUModelRunner._build_attention_metadata (runtime_patches/patch_worker_gpu_model_runner.py), which this "
    "build did not go through (Model Runner V2, VLLM_USE_V2_MODEL_RUNNER=1, is not supported, nor is a vLLM "
    "outside lminf_vllm/versions.py)"
)


def publish_requests(request_ids, finished) -> None:
    _published.update(kind="step", ids=tuple(request_ids), finished=frozenset(finished))


def publish_dummy_run() -> None:
    _published.update(kind="dummy", ids=None, finished=frozenset())


def clear_published() -> None:
    _published.update(kind=None, ids=None, finished=frozenset())


def published_requests(num_reqs: int) -> dict:
    """StepBatch's request_ids, finished, dummy and missing for a batch of num_reqs requests."""
    kind, ids = _published["kind"], _published["ids"]
    if kind == "dummy":
        return {"dummy": True}
    if kind is None:
        return {"missing": NOT_PUBLISHED}
    if len(ids) != num_reqs:
        return {"finished": _published["finished"],
                "missing": f"the model runner published {len(ids)} request ids for a batch of {num_reqs}"}  # fmt: skip
    return {"request_ids": ids, "finished": _published["finished"]}


@dataclass
class LayerMath:
    """What one attention layer adds to the step's plan."""

    scale: float
    rotary: RotarySpec | None  # None for ALiBi models
    alibi: torch.Tensor | None  # [H] slopes of the bias -m * d
    inv_freq: torch.Tensor | None = None  # rotary.inv_freq (float64) on the query's device
    name: str | None = None  # vLLM's name of the layer (the top-k host store's key)

    @classmethod
    def on_device(cls, scale: float, rotary: RotarySpec | None, alibi_slopes, device,
                  name: str | None = None) -> "LayerMath":  # fmt: skip
        if rotary is None and alibi_slopes is None:
            raise RuntimeError("lminf attention layer was never bound to its rotary embedding; "
                               "the model loader patch did not run")  # fmt: skip
        alibi = None if alibi_slopes is None else torch.tensor(alibi_slopes, dtype=torch.float32, device=device)
        inv_freq = None if rotary is None else rotary.inv_freq.to(device, torch.float64)
        return cls(scale, rotary, alibi, inv_freq, name)
