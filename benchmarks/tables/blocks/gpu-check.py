"""The H200 correctness checks: a summary computed over the cases (shared with the README), then each case."""

from tables.commands import gpu_run_command
from tables.common import GPU, load, sci, table
from tables.gpu import gpu_check_summary


def render(doc) -> str:
    rel = f"{GPU}/gpu_check.json"
    res = load(rel)["results"]
    rows = [[f"`{k}`", sci(r["err"]), r.get("tol", ""), "pass" if r["ok"] else "FAIL"] for k, r in res.items()]
    return "\n\n".join([gpu_check_summary(), table(["case", "max error", "tolerance", ""], rows),
                        doc.source(rel, gpu_run_command())])
