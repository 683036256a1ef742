"""vllm_compat.py: the installed vLLM's branch runs for real; the 0.26 branch is held to the
shape its source states (docs/vllm-0.26.md), since 0.26 itself only runs on the GPU machine."""

import builtins

import torch

from lminf_vllm import vllm_compat


def test_installed_vllm_gets_the_layout_the_paths_index():
    from vllm.v1.kv_cache_interface import KVCacheLayout

    from lminf_vllm.backend import LminfAttentionBackend

    assert LminfAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)


def test_vllm_026_branch_states_the_same_tensor(monkeypatch):
    real_import = builtins.__import__

    def without_kv_cache_layout(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "vllm.v1.kv_cache_interface" and "KVCacheLayout" in (fromlist or ()):
            raise ImportError("no KVCacheLayout before vLLM 0.27")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", without_kv_cache_layout)
    api = vllm_compat.kv_cache_shape_api()
    assert set(api) == {"get_kv_cache_shape"}
    shape = api["get_kv_cache_shape"].__func__(7, 16, 2, 64)
    assert shape == (7, 2, 16, 128)  # [blocks, kv heads, rows, K|V]
    assert torch.empty(shape).is_contiguous()  # no stride order: the physical layout is this one


def test_extra_retained_tokens_default_to_zero_where_vllm_has_none():
    class OldSpec:  # 0.26's SlidingWindowSpec has no such field
        pass

    class NewSpec:
        extra_retained_tokens = 3

    assert vllm_compat.extra_retained_tokens(OldSpec()) == 0
    assert vllm_compat.extra_retained_tokens(NewSpec()) == 3
