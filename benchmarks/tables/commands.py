"""The command line under a table, rebuilt from the arguments a benchmark recorded in its JSON."""

import ast

from tables.common import GPU, ROOT, home


def script_defaults(script: str) -> dict:
    """Literal argparse defaults of a benchmark script and the shared options,
    read from the source (importing the script would import vLLM)."""
    defaults: dict = {}
    source = (ROOT / script).read_text()
    shared = "benchmarks/shape_args.py" if "shape_args" in source else None
    for name in filter(None, (script, shared)):
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
                continue
            flag = next((a.value for a in node.args if isinstance(a, ast.Constant)), "")
            if not str(flag).startswith("--"):
                continue
            key = flag[2:].replace("-", "_")
            if key in defaults:  # the script's own option wins over a shared one
                continue
            for kw in node.keywords:
                if kw.arg == "default":
                    try:
                        defaults[key] = ast.literal_eval(kw.value)
                    except ValueError:
                        pass
                elif kw.arg == "action" and getattr(kw.value, "value", "") == "store_true":
                    defaults[key] = False
    return defaults


def command(script: str, args: dict, out: str) -> str:
    """`python SCRIPT` with the options whose recorded value is not the script's
    default (the JSON stores str() of each value), writing to `out`."""
    defaults = script_defaults(script)
    parts = [f"python {script}"]
    for key, value in args.items():
        if key == "out" or (key in defaults and str(defaults[key]) == value):
            continue
        flag = "--" + key.replace("_", "-")
        if value == "True":
            parts.append(flag)
            continue
        if value in ("None", "False"):
            continue
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        items = parsed if isinstance(parsed, list) else [parsed]
        parts.append(flag + " " + " ".join(home(str(v)) for v in items))
    parts.append(f"--out {out}")
    return " ".join(parts)


def gpu_run_command() -> str:
    return f"OUT={GPU} bash benchmarks/gpu_run.sh"
