"""lminf-vllm: LM-Infinite (arXiv 2308.16137) attention for vLLM.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every
process it starts (front-end, engine core, workers), in every engine, whether
or not it selects lminf; so it must be cheap, safe to call many times, and must
never stop an engine that does not use lminf. Heavy imports stay inside it.

On a vLLM version lminf was not written for (lminf_vllm/versions.py) it logs
one warning, registers no backend and applies no patch. Its one touch there is
the name: looking up the attention backend "lminf" raises
`UnsupportedVllmVersion` (installed and supported versions) instead of vLLM's
"Unknown attention backend". Every other name resolves as before.
"""

import logging

__version__ = "0.1.0"

logger = logging.getLogger("vllm.lminf")  # under "vllm" so vLLM's log setup shows it
_warned_unsupported = False


def register() -> None:
    from lminf_vllm.versions import installed_vllm_version, is_supported

    version = installed_vllm_version()
    if not is_supported(version):
        _stay_out(version)
        return

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from lminf_vllm import runtime_patches
    from lminf_vllm.kv_cache import register_kv_cache_spec
    from lminf_vllm.vllm_config import BACKEND_PATH

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    register_kv_cache_spec()
    runtime_patches.apply_all()


def _stay_out(version: str) -> None:
    global _warned_unsupported
    from lminf_vllm.versions import unsupported_message

    message = unsupported_message(version)
    if not _warned_unsupported:
        _warned_unsupported = True
        logger.warning("%s The lminf attention backend is not registered; other backends are unaffected.", message)
    _refuse_the_name(message)


class _RefusingNames(dict):
    """AttentionBackendEnum's member map, except that a miss on "lminf" says why."""

    message = ""

    def __missing__(self, name):
        from lminf_vllm.versions import UnsupportedVllmVersion
        from lminf_vllm.vllm_config import ALIASES

        if name in ALIASES or str(name).upper() in ALIASES:
            raise UnsupportedVllmVersion(self.message)
        raise KeyError(name)  # what a plain dict raises: vLLM's own message follows


def _refuse_the_name(message: str) -> None:
    # Enum name lookup is `cls._member_map_[name]` (Python's enum module), so a
    # dict subclass with __missing__ changes only lookups that would fail anyway.
    try:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
    except ImportError:  # moved in this vLLM: the warning above has to do
        return
    members = AttentionBackendEnum._member_map_
    if not isinstance(members, _RefusingNames):
        members = _RefusingNames(members)
        AttentionBackendEnum._member_map_ = members
    members.message = message
