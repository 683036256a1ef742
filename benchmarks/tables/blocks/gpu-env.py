"""The H200 machine's environment, as gpu_run.sh wrote it (a text file, shown as it is)."""

from tables.commands import gpu_run_command
from tables.common import GPU, ROOT


def render(doc) -> str:
    rel = f"{GPU}/env.txt"
    lines = (ROOT / rel).read_text().strip().splitlines()
    return "\n\n".join(["```\n" + "\n".join(lines) + "\n```", doc.source(rel, gpu_run_command())])
