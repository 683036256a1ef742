"""Starting real vLLM engines in tests, and reading what they return."""

import contextlib
import gc

import torch


def lminf_options(global_tokens=None, local_tokens=None, distance_cap=None) -> dict:
    cfg = {"global_tokens": global_tokens, "local_tokens": local_tokens, "distance_cap": distance_cap}
    return {"lminf": {k: v for k, v in cfg.items() if v is not None}}


@contextlib.contextmanager
def engine(model, backend="lminf", lminf=None, **kwargs):
    """A vllm.LLM in float32 on a small KV pool; torn down on exit."""
    from vllm import LLM

    options = dict(
        model=str(model),
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
        attention_backend=backend,
        block_size=32,
        seed=0,
        additional_config=lminf or {},
    )
    options.update(kwargs)
    llm = LLM(**options)
    try:
        yield llm
    finally:
        # Shut down now: if a later `with engine(...) as llm` rebinds the name,
        # collecting this one then would tear down the new engine's
        # process-wide distributed state. (Shutdown runs only once.)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def worker_runner(llm):
    """The model runner inside an in-process engine."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner


def worker_model(llm):
    """The torch model inside an in-process engine."""
    return worker_runner(llm).model


def prompt_logprobs(request_output, token_ids) -> torch.Tensor:
    """[n-1] float64: logprob of each prompt token given the ones before it."""
    entries = request_output.prompt_logprobs[1:]
    return torch.tensor([e[t].logprob for e, t in zip(entries, token_ids[1:])], dtype=torch.float64)


def sample_logprobs(completion) -> torch.Tensor:
    """[k] float64: logprob of each generated token (needs SamplingParams(logprobs=0))."""
    return torch.tensor(
        [e[t].logprob for e, t in zip(completion.logprobs, completion.token_ids)], dtype=torch.float64
    )


def random_prompt(n: int, seed: int, vocab: int = 290) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=g).tolist()


def page_bytes(num_layers=2, num_kv_heads=2, head_size=32, block_size=32, dtype_bytes=4) -> int:
    """Bytes of one KV block across all layers of the tiny test model."""
    return num_layers * num_kv_heads * 2 * head_size * block_size * dtype_bytes


def kv_manager(llm):
    """The scheduler's KV manager of the (only) cache group of an in-process engine."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    return scheduler.kv_cache_manager.coordinator.single_type_managers[0]


def held_blocks(manager) -> dict[str, int]:
    """Real (non-null) blocks each request holds right now."""
    return {rid: sum(not b.is_null for b in blocks) for rid, blocks in manager.req_to_blocks.items() if blocks}
