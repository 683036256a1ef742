"""Small deterministic random models, built in seconds, for tests and benchmarks.

Attention is made peaked on purpose (large q/k weights): a wrong mask or a
wrong distance then moves the logprobs by far more than the tolerances.
"""

import json
from pathlib import Path

import torch

CORPUS = (
    "def main(argv):\n    return sum(int(x) for x in argv if x.isdigit())\n"
    "The quick brown fox jumps over the lazy dog. 0123456789\n"
    "class Node:\n    def __init__(self, value, next=None):\n        self.value = value\n"
) * 20


# A minimal chat format, so that /v1/chat/completions works on test models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_tokenizer(out: Path, vocab_size: int = 300) -> int:
    """A byte-level BPE tokenizer trained on a few lines; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return tok.get_vocab_size()


def build_llama(
    out: Path,
    *,
    max_position_embeddings: int = 128,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    num_layers: int = 2,
    qk_std: float = 0.2,
    seed: int = 0,
    architecture: str = "llama",
    **config_overrides,
) -> Path:
    """A random Llama-family model (head size 32, which stock CPU attention also accepts)."""
    from transformers import AutoConfig

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    config = AutoConfig.for_model(
        architecture,
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
        **config_overrides,
    )
    return _save_random(config, out, qk_std, seed)


# Other RoPE families on the same scale (head size 32): partial rotary width and
# pair layout differ, which is what they are here to exercise.
FAMILY_CONFIGS = {
    "gptj": lambda h, heads, layers, table: dict(
        n_embd=h, n_head=heads, n_layer=layers, n_positions=table, rotary_dim=16  # interleaved pairs
    ),
    "gpt_neox": lambda h, heads, layers, table: dict(
        hidden_size=h, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=2 * h,
        max_position_embeddings=table, rotary_pct=0.25,  # 8 of 32 features rotate
    ),
    "bloom": lambda h, heads, layers, table: dict(
        hidden_size=h, n_head=heads, n_layer=layers  # ALiBi: no positions table at all
    ),
    "phi": lambda h, heads, layers, table: dict(
        hidden_size=h, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=2 * h,
        max_position_embeddings=table, partial_rotary_factor=0.5,  # 16 of 32
    ),
}


def build_family(
    out: Path,
    model_type: str,
    *,
    max_position_embeddings: int = 128,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_layers: int = 2,
    qk_std: float = 0.2,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """A random model of another RoPE family (FAMILY_CONFIGS), head size 32."""
    from transformers import AutoConfig

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    shape = FAMILY_CONFIGS[model_type](hidden_size, num_heads, num_layers, max_position_embeddings)
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, initializer_range=0.1, bos_token_id=0, eos_token_id=0, **shape, **config_overrides
    )
    return _save_random(config, out, qk_std, seed)


def _save_random(config, out: Path, qk_std: float, seed: int) -> Path:
    """Random weights with peaked attention (q/k weights of std qk_std), saved in float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    heads = config.num_attention_heads
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0.0, qk_std)
            elif name.endswith("query_key_value.weight"):  # GPT-NeoX, BLOOM: per head [q, k, v]
                p.view(heads, 3, -1, p.shape[-1])[:, :2].normal_(0.0, qk_std)
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
