"""Make `lminf` a name of vLLM's CUSTOM attention backend.

Target: vllm.v1.attention.backends.registry.AttentionBackendEnum (its member map).
Why: `--attention-backend lminf` is looked up as `AttentionBackendEnum["LMINF"]`.
    A new enum member made at plugin load does not survive into the engine-core
    subprocess (its config is unpickled before plugins load); CUSTOM does.
How: add "LMINF" (and "lminf") to the enum's `_member_map_` as aliases of CUSTOM,
    whose class path `register()` sets through vLLM's own `register_backend`.
Upstream: an alias argument for `register_backend`, or enum members resolved
    by name at unpickle time, would make this unnecessary.
Remove when: vLLM lets a plugin register a named backend that pickles by name.
"""

from lminf_vllm.versions import SUPPORTED_VLLM_SERIES
from lminf_vllm.vllm_config import ALIASES

TARGET = "vllm.v1.attention.backends.registry"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES


def apply() -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    members = AttentionBackendEnum._member_map_
    if all(members.get(a) is AttentionBackendEnum.CUSTOM for a in ALIASES):
        return False
    for alias in ALIASES:
        members[alias] = AttentionBackendEnum.CUSTOM
    return True


def is_applied() -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return all(AttentionBackendEnum._member_map_.get(a) is AttentionBackendEnum.CUSTOM for a in ALIASES)
