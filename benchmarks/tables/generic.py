r"""The one generic renderer: a block's JSON spec says what its results file shows.

A spec, benchmarks/tables/blocks/NAME.json, for the block `<!-- generated:NAME -->`:

    {
      "file": "benchmarks/results/cpu_prefill.json",
      "parts": [
        {"rows": "rows", "columns": [["prompt", "{prompt}"],
                                     ["stock µs/query", "{stock_us_per_query:,.2f}", ""],
                                     ["PyTorch / kernel", "{torch_us_per_query/kernel_us_per_query:ratio}"]]},
        "One layer, {args.heads} query heads; fastest of {args.repeats} calls.",
        {"image": "alt text"},
        {"source": {"script": "benchmarks/cpu_prefill.py"}}
      ]
    }

Parts, in their order, separated by blank lines:
  "TEXT"                    a paragraph: a template over the file
  {"rows", "columns"}       a table, one row per item of `rows`; a column is [HEADER, TEMPLATE],
                            or [HEADER, TEMPLATE, TEXT] to show TEXT when a field is missing
  {"image": ALT}            the .png beside the file
  {"source": COMMAND}       "Source: [FILE](link); made by `COMMAND`.": COMMAND is a template
                            ("{command}" where the JSON records it) or {"script": PATH} to rebuild
                            it from the arguments the JSON records under "args"
Optional "lists": {"NAME": {"rows": ..., "each": TEMPLATE, "sep": "; "}} joins rows into {NAME};
other keys are ignored (write a comment as "why").

Templates are str.format's; a field is a path into the JSON:
  {a.b.0}         keys and list indexes; {rows.backend=lminf.dtype}: the first item whose backend is lminf
  {a/b}           a divided by b (b a path or a number)
  {a|TEXT}        TEXT where a is missing or None (null, or "None" as recorded arguments store it)
and a format is Python's (",.1f", ".0%", ".1e", "g") or tokens (4k), ratio (1.23x), home (~/...),
len, ?YES/NO (YES where the value is true).
In a table a path looks in the row first, then in the file. `rows` names a list, or a dict (its
keys are {key}); with "group": FIELD a row is each distinct value of FIELD ({key}), in which
"pivot": FIELD names the members (group prompt_tokens, pivot backend: {lminf.prefill_tok_s}).
"""

import string

from tables.common import Doc, home, load, ratio, table, tokens
from tables.commands import command


class Missing(LookupError):
    """A template names a path the file does not have, or has as None."""


class Literal(str):
    """A fallback text: shown as it is, whatever the format asks."""


FORMATS = {"tokens": tokens, "ratio": ratio, "home": home, "len": lambda v: str(len(v))}


def lookup(scopes: list, path: str):
    """The value at a dotted path, from the first scope whose top level has its first key."""
    first, *steps = path.split(".")
    scope = next((s for s in scopes if isinstance(s, dict) and first in s), None)
    if scope is None:
        raise Missing(path)
    value = scope[first]
    try:
        for step in steps:
            if isinstance(value, list) and "=" in step:
                key, want = step.split("=", 1)
                value = next(v for v in value if str(v.get(key)) == want)
            else:
                value = value[int(step)] if isinstance(value, list) else value[step]
    except (LookupError, ValueError, TypeError, StopIteration):
        raise Missing(path) from None
    if value is None or value == "None":
        raise Missing(path)
    return value


def number_or_path(scopes: list, text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return lookup(scopes, text)


class Template(string.Formatter):
    def __init__(self, scopes: list):
        self.scopes = scopes

    def get_field(self, name, args, kwargs):
        path, bar, fallback = name.partition("|")
        try:
            if "/" in path:
                top, bottom = path.split("/", 1)
                return lookup(self.scopes, top) / number_or_path(self.scopes, bottom), name
            return lookup(self.scopes, path), name
        except Missing:
            if bar:
                return Literal(fallback), name
            raise

    def format_field(self, value, spec):
        if isinstance(value, Literal):
            return str(value)
        if spec.startswith("?"):
            yes, _, no = spec[1:].partition("/")
            return yes if value and value != "False" else no
        custom = FORMATS.get(spec)
        return custom(value) if custom else format(value, spec)


def fmt(template: str, *scopes) -> str:
    try:
        return Template(list(scopes)).vformat(template, (), {})
    except Missing as e:
        raise Missing(f"{e.args[0]!r} is missing or None (in {template!r})") from None


def rows_of(data: dict, spec: dict) -> list[dict]:
    items = lookup([data], spec["rows"])
    if isinstance(items, dict):  # each value a row, its key as {key}
        items = [{**v, "key": k} if isinstance(v, dict) else {"key": k, "value": v} for k, v in items.items()]
    if "group" in spec:  # one row per distinct value, its members by their pivot field
        groups: dict = {}
        for item in items:
            groups.setdefault(item[spec["group"]], {"key": item[spec["group"]]})[item[spec["pivot"]]] = item
        items = list(groups.values())
    return items


def table_part(data: dict, part: dict) -> str:
    def cell(column: list, row: dict) -> str:
        try:
            return fmt(column[1], row, data)
        except Missing:
            if len(column) > 2:
                return column[2]
            raise

    columns = part["columns"]
    return table([fmt(c[0], data) for c in columns], [[cell(c, row) for c in columns] for row in rows_of(data, part)])


def part_text(doc: Doc, data: dict, file: str, part) -> str:
    if isinstance(part, str):
        return fmt(part, data)
    if "columns" in part:
        return table_part(data, part)
    if "image" in part:
        return doc.image(file.replace(".json", ".png"), part["image"])
    if "source" in part:
        how = part["source"]
        made_by = command(how["script"], lookup([data], how.get("args", "args")), file) if isinstance(how, dict) \
            else fmt(how, data)
        return doc.source(file, made_by)
    raise ValueError(f"a part is text, or has columns, image or source: {part!r}")


def render(doc: Doc, spec: dict) -> str:
    file = spec["file"]
    data = load(file)
    for name, joined in spec.get("lists", {}).items():
        data = {**data, name: joined.get("sep", ", ").join(fmt(joined["each"], item, data)
                                                          for item in rows_of(data, joined))}
    return "\n\n".join(part_text(doc, data, file, part) for part in spec["parts"])
