"""The soak test's rounds, and the peak RSS's growth from round to round (differences of rows)."""

from tables.common import RESULTS, load, num, ratio, table


def render(doc) -> str:
    rel = f"{RESULTS}/soak.json"
    s = load(rel)
    rounds = s["rounds"]
    rows = [[r["round"], r["requests"], r["hung_up"], r["completed"], r["complete_with_all_tokens"], r["tokens"],
             r["seconds"], num(r["peak_rss_mib"]), "yes" if r["healthy_after"] else "no"] for r in rounds]
    rss = [r["peak_rss_mib"] for r in rounds]
    steps = ", ".join(f"{b - a:+.0f}" for a, b in zip(rss, rss[1:]))
    cmd = (f"python benchmarks/soak.py --rounds {len(rounds)} --concurrency {rounds[0]['requests']} "
           f"--tokens {s['tokens_per_stream']} --out {rel}")
    return "\n\n".join([
        table(["round", "requests", "hung up", "completed", "with all tokens", "tokens", "s", "peak RSS MiB",
               "healthy after"], rows),
        f"In all: {s['total_requests']} requests, {s['total_tokens']:,} generated tokens in {s['total_seconds']} s; "
        f"problems reported: {len(s['problems'])}. Peak RSS of the server's process tree from round 1 to round "
        f"{len(rounds)}: {ratio(rss[-1] / rss[0])} (MiB per round: {steps}).",
        doc.source(rel, cmd)])
