"""Offline text for the tiny RoPE model: the CPython standard library sources.

Every machine with Python has them, so training and evaluation need no
download. Tokens are bytes (id = byte value) plus one end-of-text token; the
saved Hugging Face tokenizer encodes text to the same ids.
"""

import sysconfig
import zlib
from pathlib import Path

import torch

EOS_ID = 256
VOCAB_SIZE = 257
SKIP_PARTS = {"site-packages", "test", "tests", "idle_test"}


def is_held_out(rel_path: str) -> bool:
    """About 1 file in 12, fixed by a hash of its path (not by Python's salted hash())."""
    return zlib.crc32(rel_path.encode()) % 12 == 0


def stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if not SKIP_PARTS.intersection(rel.split("/")[:-1]):
            files.append((rel, path))
    return files


def split_documents() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts)."""
    train, held = [], []
    for rel, path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        (held if is_held_out(rel) else train).append(text)
    return train, held


def held_out_documents(min_tokens: int, encode_text=None) -> list[tuple[str, list[int]]]:
    """Held-out files at least min_tokens long (bytes, or encode_text's tokens), longest first."""
    encode_text = encode_text or encode
    docs = []
    for rel, path in stdlib_files():
        if is_held_out(rel) and not rel.startswith("encodings/"):  # codec tables: not prose or code
            ids = encode_text(path.read_text(encoding="utf-8", errors="replace"))
            if len(ids) >= min_tokens:
                docs.append((rel, ids))
    return sorted(docs, key=lambda d: -len(d[1]))


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def encode_concat(texts: list[str]) -> torch.Tensor:
    ids = []
    for t in texts:
        ids.extend(encode(t))
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def save_tokenizer(out: Path) -> None:
    """A byte-level BPE with no merges whose id for each byte is the byte's value."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins, unordered
    mapping = _bytes_to_unicode()
    assert set(mapping.values()) == set(byte_to_char)
    vocab = {mapping[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    sample = "def f(x):\n    return x  # ünïcode ✓\n"
    assert fast(sample)["input_ids"] == encode(sample), "saved tokenizer disagrees with corpus.encode"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
