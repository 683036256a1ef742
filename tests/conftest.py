import os

# In-process engines start in seconds; without thread binding they run at full
# speed on a shared CI machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from lminf_vllm.testing.tiny_models import build_llama  # noqa: E402

TABLE = 128  # max_position_embeddings of the tiny test model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Random Llama, 2 layers, 4 heads / 2 KV heads of size 32, table of 128 positions."""
    return build_llama(tmp_path_factory.mktemp("models") / "tiny-llama", max_position_embeddings=TABLE)
