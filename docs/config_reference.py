"""The configuration reference, generated from the config dataclasses so that it is never written twice.

Every dataclass named `*Config` or `*Spec` in the project's packages is listed, field by field: its key, type,
default and meaning. The meaning is the field's own comment (trailing, on the lines right after a trailing one, or
the block just above it), else the clause of the class docstring that names the field in backticks.

Registered as a mkdocs hook (`hooks:` in mkdocs.yml): `docs/configuration.md` holds the marker below, replaced at
build time. `python docs/config_reference.py` prints the generated part.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("retrotune", "retro", "retrieval", "peft_methods", "backbones")
MARKER = "<!-- config-reference -->"

# (title, introduction, [(module, class, key prefix)]); the PEFT methods are added from their registry, and any
# config dataclass not named here lands in a last section, so a new one is never left out.
SECTIONS = [
    ("Run config", "`python train.py CONFIG [key=value ...]` and `eval.py zero-shot`/`checkpoint`: a YAML file under "
     "`configs/` whose top level is `RunConfig`; nested keys are overridden as `train.lr=3e-4`.",
     [("retrotune.config", "RunConfig", ""), ("retrotune.config", "TrainConfig", "train."),
      ("retrotune.config", "DataConfig", "data."), ("retro.config", "RetroConfig", "retro.")]),
    ("PEFT methods", "`peft:` in a run config (`{method: lora, r: 8}`), or an entry of `peft:` in an experiment. "
     "`method` picks one of the tables below; the other keys are that method's fields.", []),
    ("Experiment", "`python eval.py experiment FILE` (`configs/demo.yaml`, `configs/experiment_gpu.yaml`).",
     [("retrotune.experiment", "ExperimentConfig", "")]),
    ("Paper grid", "`python eval.py paper FILE` (`configs/paper.yaml`).", [("retrotune.grid", "GridConfig", "")]),
    ("Retrieval", "`python -m retrieval build` and the `retrieval` Python API; the command line's flags set these "
     "fields (`--factory`, `--memory-budget-gb`, `--fusion`, `--rerank-depth`, ...).",
     [("retrieval.build", "BuildConfig", ""), ("retrieval.index", "IndexConfig", "index."),
      ("retrieval.lexical", "LexicalConfig", "lexical."), ("retrieval.fusion", "FusionConfig", ""),
      ("retrieval.rerank", "RerankConfig", ""), ("retrieval.corpus", "CorpusSpec", "")]),
]


def config_classes() -> list[tuple[str, str]]:
    """(module, class) of every dataclass named *Config or *Spec in the packages, found without importing them."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for node in tree.body:
                if (isinstance(node, ast.ClassDef) and node.name.endswith(("Config", "Spec"))
                        and any("dataclass" in ast.unparse(d) for d in node.decorator_list)):
                    found.append((module, node.name))
    return found


def _comments(path: Path) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_comments(cls) -> dict[str, str]:
    """Field name -> its comment, for the fields `cls` itself declares."""
    path = Path(sys.modules[cls.__module__].__file__)
    lines = path.read_text().splitlines()
    comments = _comments(path)
    tree = ast.parse("\n".join(lines))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = {}
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        start, end = item.lineno, item.end_lineno
        above = []
        line = start - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[end]] if end in comments and not lines[end - 1].strip().startswith("#") else []
        if trailing:  # comment lines right after a trailing comment continue it, unless a field follows them
            line = end + 1
            more = []
            while line <= len(lines) and lines[line - 1].strip().startswith("#"):
                more.append(comments[line])
                line += 1
            next_line = lines[line - 1].strip() if line <= len(lines) else ""
            if more and not re.match(r"^\w+\s*:", next_line):
                trailing += more
        out[item.target.id] = " ".join(above + trailing).strip()
    return out


def _docstring_clause(cls, name: str) -> str:
    text = " ".join((cls.__doc__ or "").split())
    clauses = re.split(r"(?<=;)\s+|(?<!e\.g\.)(?<=\.)\s+(?=[A-Z`])", text)
    return " ".join(c.rstrip(";") for c in clauses if f"`{name}`" in c).strip()


def _meaning(cls, name: str) -> str:
    """The comment of the class that declares `name` (walking the bases), else a docstring clause naming it."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return _field_comments(klass).get(name) or _docstring_clause(klass, name) or _docstring_clause(cls, name)
    return _docstring_clause(cls, name)


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _default(field: dataclasses.Field) -> str:
    import yaml

    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return f"`{type(value).__name__}()`"
    return "`" + yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=10_000).strip().removesuffix("...")\
        .strip() + "`"


@dataclasses.dataclass
class Row:
    key: str
    type: str
    default: str
    meaning: str


def rows(cls, prefix: str = "") -> list[Row]:
    out = []
    for field in dataclasses.fields(cls):
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        out.append(Row(prefix + field.name, kind, _default(field), _meaning(cls, field.name)))
    return out


def _sections() -> list[tuple[str, str, list[tuple[type, str]]]]:
    """(title, introduction, [(class, prefix)]) in page order, every config class once."""
    from peft_methods import METHODS

    placed, sections = set(), []
    for title, intro, entries in SECTIONS:
        classes = []
        for module, name, prefix in entries:
            classes.append((getattr(importlib.import_module(module), name), prefix))
        if title == "PEFT methods":
            from peft_methods import MethodConfig

            classes = [(MethodConfig, "peft.")] + [(method.config_cls, "peft.") for method in METHODS.values()]
        placed.update(cls for cls, _ in classes)
        sections.append((title, intro, classes))
    rest = []
    for module, name in config_classes():
        cls = getattr(importlib.import_module(module), name)
        if cls not in placed and any(f for f in dataclasses.fields(cls)):
            rest.append((cls, ""))
    if rest:
        sections.append(("Other", "", rest))
    return sections


def reference() -> dict[type, list[Row]]:
    """Every config class with its rows, as the page lists them."""
    return {cls: rows(cls, prefix) for _, _, classes in _sections() for cls, prefix in classes}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    parts = []
    for title, intro, classes in _sections():
        parts += [f"## {title}", "", intro, ""] if intro else [f"## {title}", ""]
        for cls, prefix in classes:
            where = cls.__module__.replace(".", "/") + ".py"
            method = getattr(cls, "method", "")
            heading = f"`{cls.__name__}`" + (f": `method: {method}`" if method and prefix == "peft." else "")
            parts += [f"### {heading}", "", f"Defined in `{where}`."]
            doc = (cls.__doc__ or "").strip().split("\n\n")[0]
            if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses make up a signature when undocumented
                parts += ["", " ".join(doc.split())]
            parts += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
            for row in rows(cls, prefix):
                parts.append(f"| `{row.key}` | `{_cell(row.type)}` | {_cell(row.default)} | {_cell(row.meaning)} |")
            parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """mkdocs hook: fill the configuration page."""
    if MARKER in markdown:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        markdown = markdown.replace(MARKER, render())
    return markdown


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(render())
