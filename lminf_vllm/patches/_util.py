"""Shared mechanics of the runtime patches: idempotent replace, original kept."""

from typing import Any, Callable

from lminf_vllm.versions import check_vllm_version

_MARK = "__lminf_original__"


def replace_attr(owner: Any, name: str, make_new: Callable[[Any], Any]) -> bool:
    """Set owner.name = make_new(original) once; later calls do nothing. Returns True if applied now."""
    current = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if getattr(_unwrap(current), _MARK, None) is not None:
        return False
    original = current
    new = make_new(_unwrap(original))
    setattr(_unwrap(new), _MARK, original)
    setattr(owner, name, new)
    return True


def original_of(owner: Any, name: str) -> Any:
    current = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    return getattr(_unwrap(current), _MARK, current)


def is_patched(owner: Any, name: str) -> bool:
    current = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    return getattr(_unwrap(current), _MARK, None) is not None


def _unwrap(obj: Any) -> Any:
    # classmethod/staticmethod objects hold the function in __func__
    return getattr(obj, "__func__", obj) if isinstance(obj, (classmethod, staticmethod)) else obj


def guard_version() -> None:
    check_vllm_version()
