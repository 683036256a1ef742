"""The patches to vLLM are listed, documented, applied, idempotent and upstreamable."""

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import check_vllm_version, original_of
from lminf_vllm import runtime_patches
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES, UnsupportedVllmVersion, is_supported

ROOT = Path(__file__).resolve().parents[1]
PATCH_DIR = ROOT / "lminf_vllm" / "runtime_patches"
SECTIONS = ("Target:", "Why:", "How:", "Upstream:", "Remove when:")
VLLM_PATH = re.compile(r"\bvllm(?:\.\w+)+")  # a dotted name under vllm, e.g. vllm.config.model


def resolve(dotted: str):
    """The object a dotted vLLM name means: its longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as e:
            if e.name is None or not ".".join(parts[:cut]).startswith(e.name):
                raise  # the module exists but an import inside it failed: say so
            continue
        for i, attr in enumerate(parts[cut:], start=cut):
            assert hasattr(obj, attr), f"{'.'.join(parts[:i])} has no attribute {attr!r} (named {dotted})"
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"{dotted}: no such module")


def docstring_of(name: str) -> str:
    return ast.get_docstring(ast.parse((PATCH_DIR / f"{name}.py").read_text())) or ""


def test_plugin_is_found_through_its_entry_point():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "lminf_vllm:register" for ep in eps)


def test_every_patch_file_is_listed_and_every_listed_patch_exists():
    files = {p.stem for p in PATCH_DIR.glob("patch_*.py")}
    assert files == set(runtime_patches.PATCH_MODULES)


@pytest.mark.parametrize("name", runtime_patches.PATCH_MODULES)
def test_patch_is_documented_versioned_and_in_the_readme(name):
    module = runtime_patches.load(name)
    doc = docstring_of(name)
    for section in SECTIONS:
        assert section in doc, f"{name} docstring lacks {section!r}"
    assert module.TARGET.startswith("vllm.")
    assert set(module.VLLM_VERSIONS) <= set(SUPPORTED_VLLM_SERIES)
    readme = (ROOT / "patches" / "README.md").read_text()
    assert f"`{name}`" in readme and f"`{name}.diff`" in readme
    assert (ROOT / "patches" / f"{name}.diff").read_text().startswith("--- a/vllm/")


@pytest.mark.parametrize("name", runtime_patches.PATCH_MODULES)
def test_what_a_patch_docstring_names_exists_in_the_installed_vllm(name):
    """Target: and every vllm.x.y the docstring mentions resolve in the installed vLLM, so that
    a module or attribute renamed upstream fails here rather than misleading a reader."""
    module = runtime_patches.load(name)
    doc = docstring_of(name)
    target_line = next(line for line in doc.splitlines() if line.startswith("Target:"))
    # "Target: vllm.a.B.m and ._n (note)": the first path, then siblings of its last part
    first = VLLM_PATH.search(target_line).group(0)
    assert first.startswith(module.TARGET), f"docstring Target {first} is not the module's TARGET {module.TARGET}"
    rest = target_line.split(first, 1)[1].split("(")[0]
    named = [first] + [first.rsplit(".", 1)[0] + sibling for sibling in re.findall(r"\.\w+", rest)]
    named += VLLM_PATH.findall(doc)
    for dotted in dict.fromkeys(named):
        resolve(dotted)


def test_the_name_check_catches_a_missing_module_or_attribute():
    resolve("vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls")
    with pytest.raises(AssertionError, match="no attribute 'get_attn_backend_clz'"):
        resolve("vllm.platforms.cpu.CpuPlatform.get_attn_backend_clz")
    with pytest.raises(AssertionError, match="no attribute 'cpuu'"):
        resolve("vllm.platforms.cpuu.CpuPlatform")


@pytest.mark.parametrize("name", runtime_patches.PATCH_MODULES)
def test_patch_is_applied_by_the_plugin_and_idempotent(name):
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does
    module = runtime_patches.load(name)
    assert module.is_applied()
    assert module.apply() is False  # a second apply changes nothing


def test_originals_are_kept():
    from vllm.platforms.cpu import CpuPlatform

    runtime_patches.apply_all()
    original = original_of(CpuPlatform, "get_attn_backend_cls")
    assert original.__module__ == "vllm.platforms.cpu"


def test_upstream_diffs_match_the_installed_vllm():
    result = subprocess.run([sys.executable, str(ROOT / "patches" / "make_diffs.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_version_guard():
    assert is_supported("0.32.0") and is_supported("0.33.1+cu130")
    assert not is_supported("0.31.2") and not is_supported("1.0.0")
    assert check_vllm_version().startswith("0.32")


def test_version_guard_message(monkeypatch):
    import lminf_vllm.versions as versions

    monkeypatch.setattr(versions, "installed_vllm_version", lambda: "0.29.0")
    with pytest.raises(UnsupportedVllmVersion, match=r"supports vLLM 0.26.x, 0.32.x, 0.33.x; the installed vLLM is 0.29.0"):
        check_vllm_version()


def test_vllm_command_starts_on_the_cpu_install():
    vllm = Path(sys.executable).with_name("vllm")
    result = subprocess.run([str(vllm), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("0.32.0+cpu")


def test_every_patched_vllm_module_has_its_deprecations_fail_the_tests():
    """pytest.ini turns deprecations in the vLLM modules the patches touch into errors:
    a new patch must be added there too."""
    import configparser
    import re

    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    rules = [line.strip() for line in ini["pytest"]["filterwarnings"].splitlines() if line.strip()]
    for category in ("DeprecationWarning", "FutureWarning"):
        (pattern,) = [r.split(":", 3)[3] for r in rules if r.startswith(f"error::{category}:vllm")]
        for name in runtime_patches.PATCH_MODULES:
            target = runtime_patches.load(name).TARGET
            module = next(m for m in _module_prefixes(target))
            assert re.match(pattern, module), f"{name}: {module} is not in pytest.ini's {category} rule"


def _module_prefixes(target: str):
    """The longest importable module path at the start of a dotted target."""
    import importlib

    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        yield ".".join(parts[:end])
