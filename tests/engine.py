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
        del llm
        gc.collect()


def worker_model(llm):
    """The torch model inside an in-process engine."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner.model


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
