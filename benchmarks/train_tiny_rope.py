"""Train the small RoPE model that the quality benchmark uses: benchmarks/models/tiny-rope-L256.

A byte-level Llama (about 3.3M parameters) trained from scratch on the CPython
standard library sources of the running interpreter, at context 256. Small
enough to train on a laptop CPU in about 20 minutes, and, like the paper's
Llama-2, it fails past its training length under stock attention: that failure
is what benchmarks/quality.py shows LM-Infinite removing.

Held-out documents (never trained on) are the stdlib modules that
`corpus.is_held_out` picks by a hash of their path. The benchmark reads the
longest of them from a pinned copy (benchmarks/data/cpython-3.11.7-heldout/),
so its numbers stay put; the training text is whatever standard library runs
this script (the shipped model was trained under CPython 3.11.7, and
training.json records the version).

    python benchmarks/train_tiny_rope.py --minutes 20
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "tiny-rope-L256"


def build_model(context: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=corpus.VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=context,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=corpus.EOS_ID,
        eos_token_id=corpus.EOS_ID,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def batches(data: torch.Tensor, batch: int, context: int, gen: torch.Generator):
    """Random windows of context + 1 tokens: every sample starts at position 0."""
    while True:
        starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
        yield torch.stack([data[s : s + context + 1] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor, context: int, windows: int = 64) -> float:
    model.eval()
    step = max(1, (data.numel() - context - 1) // windows)
    x = torch.stack([data[s : s + context + 1] for s in range(0, step * windows, step)])
    loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss  # HF shifts labels itself
    model.train()
    return float(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    ap.add_argument("--context", type=int, default=256, help="training length (the model's RoPE table)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    python = sys.version.split()[0]
    if python != corpus.PINNED_PYTHON:
        print(f"note: training on the CPython {python} standard library; the shipped model saw {corpus.PINNED_PYTHON}'s")
    train_docs, held_docs = corpus.split_documents()
    train = corpus.encode_concat(train_docs)
    held = corpus.encode_concat(held_docs)
    print(f"train: {len(train_docs)} files, {train.numel():,} bytes; held out: {len(held_docs)} files, {held.numel():,} bytes")

    model = build_model(args.context)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, context {args.context}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    warmup, total_steps = 50, None
    t0 = time.time()
    step, losses = 0, []
    for x in batches(train, args.batch, args.context, gen):
        if total_steps is None and step == 20:
            # Fix the schedule length from the measured step time, so the cosine
            # decay ends when the time budget does.
            total_steps = max(100, int(budget / ((time.time() - t0) / 20)))
            print(f"schedule: {total_steps} steps")
        horizon = total_steps or 10**9
        if step >= horizon:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / horizon))))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step}/{horizon if total_steps else '?'}  loss {sum(losses[-50:]) / 50:.3f}  lr {lr:.2e}  {time.time() - t0:.0f}s", flush=True)

    minutes = (time.time() - t0) / 60
    held_loss = held_out_loss(model, held, args.context)
    print(f"done: {step} steps in {minutes:.1f} min, train loss {sum(losses[-50:]) / 50:.3f}, held-out loss {held_loss:.3f} nats/byte")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    cfg = json.loads((args.out / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    corpus.save_tokenizer(args.out)
    stats = dict(
        parameters=n_params, context=args.context, steps=step, batch=args.batch, minutes=round(minutes, 1),
        tokens_seen=step * args.batch * args.context, train_loss=round(sum(losses[-50:]) / 50, 4),
        held_out_loss=round(held_loss, 4), train_files=len(train_docs), train_bytes=int(train.numel()),
        held_out_files=len(held_docs), python=sys.version.split()[0], torch=torch.__version__,
    )
    (args.out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(stats))
    print(f"saved to {args.out}")


def model_card(s: dict) -> str:
    return f"""# tiny-rope-L256

A {s['parameters'] / 1e6:.1f}M-parameter Llama-architecture model with RoPE (base 10,000), trained
from scratch by `benchmarks/train_tiny_rope.py` to show length generalization on a CPU. Not a
useful language model: a test subject for `benchmarks/quality.py`.

- Tokenizer: bytes (256 byte tokens + `<|endoftext|>`, Hugging Face byte-level BPE without merges).
- Architecture: 4 layers, width 256, 4 heads of 64, SwiGLU 704, tied embeddings.
- Training length (the RoPE table, `max_position_embeddings`): {s['context']} tokens.
- Data: the CPython {s['python']} standard library `.py` sources ({s['train_files']} files,
  {s['train_bytes']:,} bytes), minus {s['held_out_files']} held-out modules picked by a hash of their path
  (`benchmarks/corpus.py`); the quality benchmark reads the longest of them, pinned in
  `benchmarks/data/cpython-3.11.7-heldout/`.
- Training: {s['steps']} steps of {s['batch']} x {s['context']} bytes ({s['tokens_seen']:,} bytes seen), AdamW,
  lr 3e-3 with warm-up and cosine decay, {s['minutes']} minutes on 2 CPU cores (torch {s['torch']}).
- Loss: train {s['train_loss']:.3f}, held out {s['held_out_loss']:.3f} nats per byte at length {s['context']}.
"""


if __name__ == "__main__":
    main()
