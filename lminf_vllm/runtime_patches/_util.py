"""Shared mechanics of the runtime patches: idempotent replace, original kept."""

from typing import Any, Callable

_MARK = "__lminf_original__"


def replace_attr(owner: Any, name: str, make_new: Callable[[Any], Any]) -> bool:
    """Set owner.name = make_new(original) once; later calls do nothing. Returns True if applied now."""
    original = _lookup(owner, name)
    if getattr(_unwrap(original), _MARK, None) is not None:
        return False
    new = make_new(_unwrap(original))
    setattr(_unwrap(new), _MARK, original)
    setattr(owner, name, new)
    return True


def is_patched(owner: Any, name: str) -> bool:
    return getattr(_unwrap(_lookup(owner, name)), _MARK, None) is not None


def _lookup(owner: Any, name: str) -> Any:
    # a class's own __dict__ keeps classmethod objects as they are
    return owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)


def _unwrap(obj: Any) -> Any:
    # classmethod/staticmethod objects hold the function in __func__
    return getattr(obj, "__func__", obj) if isinstance(obj, (classmethod, staticmethod)) else obj
