import os

# In-process engines start in seconds; without thread binding they run at full
# speed on a shared CI machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs two workers) each worker gets its share of
# the cores: two workers of all cores each spin against each other in OpenMP and
# ran some engine tests 4x slower than alone. Engines the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

from lminf_vllm.testing.tiny_models import build_llama  # noqa: E402

TABLE = 128  # max_position_embeddings of the tiny test model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Random Llama, 2 layers, 4 heads / 2 KV heads of size 32, table of 128 positions."""
    return build_llama(tmp_path_factory.mktemp("models") / "tiny-llama", max_position_embeddings=TABLE)


@pytest.fixture(scope="session", autouse=True)
def _no_stale_shared_memory():
    """Segments that killed runs left (no living process maps them) go before any engine starts."""
    from shared_memory import remove_orphans, segments

    remove_orphans(segments())
    yield


@pytest.fixture(scope="module", autouse=True)
def _module_shm_cleanup():
    """The same for engines a module's fixtures ran (a served model shared by its tests)."""
    from shared_memory import remove_orphans, segments

    before = segments()
    yield
    remove_orphans(segments() - before)


@pytest.fixture(autouse=True)
def shm_left_behind():
    """Each test removes the vLLM segments its engines left in /dev/shm (shared_memory.py says why).
    A test may call it: it cleans now and returns this test's segments still there (mapped by a live process)."""
    from shared_memory import remove_orphans, segments

    before = segments()

    def clean() -> list[str]:
        remove_orphans(segments() - before)
        return sorted(segments() - before)

    yield clean
    clean()
