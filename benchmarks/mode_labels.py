"""What each quality mode is called in tables and plots: one list for the benchmarks that
write results (quality.py, generation_quality.py) and for the tables that render them.
Standard library only: benchmarks/tables/ imports it without torch or vLLM."""

QUALITY = {
    "segments": "1x: each training-length piece read alone",
    "stock": "stock attention",
    "window": "window only (G=0)",
    "lminf": "LM-Infinite",
    "nocap": "LM-Infinite, no distance cap",
    "topk": "LM-Infinite + top-k middle blocks",
}

# generation_quality.py's 1x is stock on the last L - T tokens, not pieces read alone.
GENERATION = {"1x": "1x: stock on the last L-T tokens only", **{k: v for k, v in QUALITY.items() if k != "segments"}}
