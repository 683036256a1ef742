r"""Time to first token of one long streamed chat, as a user of `make serve` sees it.

Sends one chat turn whose user message is --tokens tokens of real text (the
pinned held-out corpus) to a running server through the official `openai`
client, streamed, and records the time to the first content token and to the
last. If --server-log names the server's log, it also counts the lines the
server wrote while the prompt was prefilling (vLLM's stats lines: a long
prefill is visibly alive when they keep coming) and vLLM's "shared memory
broadcast" warnings (a step over 60 s).

    make serve PORT=8011 &   # then, once it answers:
    python benchmarks/chat_ttft.py --url http://127.0.0.1:8011/v1 --server-log serve.log \
        --label after --out benchmarks/results/chat-ttft.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from corpus import pinned_documents  # noqa: E402
from lminf_vllm.cpu_isa import describe  # noqa: E402

MODEL = Path.home() / ".cache/lminf-vllm/SmolLM2-135M-Instruct"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", type=Path, default=MODEL, help="the served model's directory (for its tokenizer)")
    p.add_argument("--tokens", type=int, default=13789, help="tokens of text in the user message")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--server-log", type=Path, help="the server's log file, to count what it wrote meanwhile")
    p.add_argument("--label", required=True, help="the row's name, e.g. 'before' or 'after'")
    p.add_argument("--server", default="make serve", help="how the server was started (recorded)")
    p.add_argument("--out", type=Path, default=Path("out/chat-ttft.json"))
    return p.parse_args(argv)


def long_message(model: Path, tokens: int) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids = tokenizer("\n\n".join(text for _, text in pinned_documents()))["input_ids"][:tokens]
    return "Summarize this code in one sentence:\n\n" + tokenizer.decode(ids)


def log_lines(path: Path | None) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path and path.exists() else []


def main(argv=None):
    from openai import OpenAI

    args = parse_args(argv)
    client = OpenAI(base_url=args.url, api_key="none", timeout=3600)
    served = client.models.list().data[0].id
    message = long_message(args.model, args.tokens)
    seen = len(log_lines(args.server_log))
    start = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": message}], max_tokens=args.max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        usage = chunk.usage or usage
    total = time.perf_counter() - start
    meanwhile = log_lines(args.server_log)[seen:]
    row = {
        "label": args.label, "server": args.server, "ttft_s": round(first, 2), "total_s": round(total, 2),
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "server_lines_meanwhile": len(meanwhile),
        "stats_lines_meanwhile": sum("Avg prompt throughput" in line for line in meanwhile),
        "shm_broadcast_warnings": sum("shared memory broadcast" in line for line in meanwhile),
        "dtype_line": next((line.split("lminf: ", 1)[1] for line in log_lines(args.server_log)
                            if "lminf: dtype auto" in line), None),
    }  # fmt: skip
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"cpu": describe(), "rows": []}
    if doc.get("cpu") != describe():  # rows of one file are compared with each other: one CPU
        raise SystemExit(f"{args.out} holds rows from another CPU ({doc.get('cpu')}); write to a new file")
    doc["rows"] = [r for r in doc["rows"] if r["label"] != args.label] + [row]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
