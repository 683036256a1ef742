"""Offline text for the tiny RoPE model and the quality benchmark.

Evaluation reads a pinned sample committed under benchmarks/data/ (see its
README): the longest held-out modules of CPython 3.11.7's standard library,
byte for byte, checked by SHA-256 on every read, so results do not move with
the Python that runs them. Training (benchmarks/train_tiny_rope.py) reads the
running Python's own standard library, minus every held-out module; its
training.json records which Python that was.

Tokens are bytes (id = byte value) plus one end-of-text token; the saved
Hugging Face tokenizer encodes text to the same ids.
"""

import hashlib
import json
import sys
import sysconfig
import zlib
from pathlib import Path

import torch

EOS_ID = 256
VOCAB_SIZE = 257
SKIP_PARTS = {"site-packages", "test", "tests", "idle_test"}
PINNED = Path(__file__).resolve().parent / "data" / "cpython-3.11.7-heldout"
PINNED_PYTHON = "3.11.7"
PINNED_COUNT = 4  # the held-out modules the published results read


def is_held_out(rel_path: str) -> bool:
    """About 1 file in 12, fixed by a hash of its path (not by Python's salted hash())."""
    return zlib.crc32(rel_path.encode()) % 12 == 0


def stdlib_files() -> list[tuple[str, Path]]:
    """The running Python's standard library modules (training text)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if not SKIP_PARTS.intersection(rel.split("/")[:-1]):
            files.append((rel, path))
    return files


def split_documents() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) from the running Python's standard library."""
    pinned = {d["name"] for d in manifest()["documents"]}
    train, held = [], []
    for rel, path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        # the pinned modules are held out by the same rule; named here too so no version can train on them
        (held if is_held_out(rel) or rel in pinned else train).append(text)
    return train, held


def manifest() -> dict:
    return json.loads((PINNED / "MANIFEST.json").read_text())


def pinned_documents() -> list[tuple[str, str]]:
    """(stdlib path, text) of the pinned sample, each checked against its recorded SHA-256."""
    docs = []
    for entry in manifest()["documents"]:
        data = (PINNED / entry["file"]).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise RuntimeError(f"{PINNED / entry['file']} changed (sha256 {digest}, pinned {entry['sha256']})")
        docs.append((entry["name"], data.decode("utf-8")))
    return docs


def corpus_info() -> dict:
    """What a results file records about the text it measured."""
    m = manifest()
    return {"name": PINNED.name, "source": m["source"], "license": m["license"],
            "sha256": {d["name"]: d["sha256"] for d in m["documents"]}}  # fmt: skip


def held_out_documents(min_tokens: int, encode_text=None) -> list[tuple[str, list[int]]]:
    """Pinned documents at least min_tokens long (bytes, or encode_text's tokens), longest first."""
    encode_text = encode_text or encode
    docs = [(name, encode_text(text)) for name, text in pinned_documents()]
    return sorted([d for d in docs if len(d[1]) >= min_tokens], key=lambda d: -len(d[1]))


def pin(count: int = PINNED_COUNT) -> None:
    """Write the pinned sample from this Python's standard library (must be CPython 3.11.7)."""
    import shutil

    if sys.version.split()[0] != PINNED_PYTHON:
        raise SystemExit(f"the pinned sample comes from CPython {PINNED_PYTHON}; this is {sys.version.split()[0]}")
    # held-out modules that are prose or code (the codec tables are neither), longest first
    held = [(rel, path) for rel, path in stdlib_files() if is_held_out(rel) and not rel.startswith("encodings/")]
    held = sorted(held, key=lambda f: -f[1].stat().st_size)[:count]
    PINNED.mkdir(parents=True, exist_ok=True)
    entries = []
    for rel, path in held:
        name = rel.replace("/", "-") + ".txt"  # .txt: not Python for linters or pytest to pick up
        shutil.copyfile(path, PINNED / name)
        entries.append({"name": rel, "file": name, "bytes": path.stat().st_size,
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})  # fmt: skip
    shutil.copyfile(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", PINNED / "LICENSE.txt")
    doc = {"source": f"CPython {PINNED_PYTHON}, Lib/ (https://github.com/python/cpython/tree/v{PINNED_PYTHON}/Lib)",
           "license": "PSF License Version 2 (LICENSE.txt beside this file)",
           "selection": "the longest modules that benchmarks/corpus.py's is_held_out picks, codec tables excluded",
           "documents": entries}  # fmt: skip
    (PINNED / "MANIFEST.json").write_text(json.dumps(doc, indent=2) + "\n")


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


if __name__ == "__main__":
    pin()
    print(f"wrote {PINNED}")
