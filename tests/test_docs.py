"""The documentation: the configuration reference covers every config field, the site builds offline with
`mkdocs build --strict`, and every command quoted in README.md and docs/*.md names an entry point, subcommand,
flag, config file and override that exist (checked with `--help` and the config loader; nothing is trained)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHERS = (".venv/bin/python", "python", "python3", "make", "torchrun", "accelerate")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"}


def _reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# -- the configuration reference ------------------------------------------------------------------------------


def test_reference_lists_every_config_field_with_a_meaning():
    ref = _reference()
    reference = ref.reference()
    names = {cls.__name__ for cls in reference}
    found = ref.config_classes()
    assert len(found) >= 20, found  # the scan itself still finds the configs
    missing = [name for _, name in found if name not in names]
    assert not missing, f"config dataclasses missing from the reference: {missing}"
    undescribed = []
    for cls, rows in reference.items():
        keys = [row.key.rsplit(".", 1)[-1] for row in rows]
        assert keys == [f.name for f in dataclasses.fields(cls)], cls.__name__
        undescribed += [f"{cls.__name__}.{row.key}" for row in rows if not row.meaning.strip()]
    assert not undescribed, ("fields without a meaning; add a trailing `# comment` on the field: "
                             f"{undescribed}")
    page = ref.render()
    for cls, rows in reference.items():
        assert f"### `{cls.__name__}`" in page
        for row in rows:
            assert f"| `{row.key}` |" in page, row.key


# -- the site ------------------------------------------------------------------------------------------------------


def test_mkdocs_build_strict_offline(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs or mkdocs-material is not installed (the `test` extra installs both)")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    config_page = (site / "configuration" / "index.html").read_text()
    for cls, rows in _reference().reference().items():
        for row in rows:
            assert f"<code>{row.key}</code>" in config_page, row.key
    fetches = re.compile(r"<(?:link|script|img|iframe)\b[^>]*\b(?:href|src)=\"(?:https?:)?//", re.I)
    for page in [*site.rglob("*.html"), *site.rglob("*.css")]:
        text = page.read_text(errors="replace")
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, page
        if page.suffix == ".html":
            assert not fetches.search(text), f"{page} loads something from the network"


# -- the commands the pages quote ------------------------------------------------------------------------------


def _quoted_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every command line in a fenced code block that starts with one of LAUNCHERS."""
    commands = []
    for page in PAGES:
        fence, pending = False, ""
        for line in page.read_text().splitlines():
            if line.lstrip().startswith("```"):
                fence, pending = not fence, ""
                continue
            if not fence:
                continue
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            words = shlex.split(line, comments=True)
            segment = []
            for word in [*words, "&&"]:
                if word in ("&&", "||", ";", "|"):
                    if segment and segment[0] in LAUNCHERS:
                        commands.append((page.name, segment))
                    segment = []
                else:
                    segment.append(word)
    return commands


def _program(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split a launcher line into the Python program (`-m module` or `script.py`) and its arguments."""
    rest = argv[1:]
    if argv[0] == "accelerate" and rest[:1] == ["launch"]:
        rest = rest[1:]
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "-m":
            return ["-m", rest[i + 1]], rest[i + 2:]
        if word.endswith(".py"):
            return [word], rest[i + 1:]
        if argv[0] in ("torchrun", "accelerate") and word.startswith("-") and "=" not in word \
                and i + 1 < len(rest) and not rest[i + 1].startswith("-") and not rest[i + 1].endswith(".py"):
            i += 2  # a launcher option and its value
        else:
            i += 1
    raise AssertionError(f"no Python program in {' '.join(argv)}")


def _entry_points() -> dict[tuple[str, ...], list[tuple[str, list[str]]]]:
    """(program..., subcommand) -> the documented (page, arguments) that use it."""
    entries: dict[tuple[str, ...], list] = {}
    for page, argv in _quoted_commands():
        if argv[0] == "make":
            continue
        program, args = _program(argv)
        is_sub = args and re.fullmatch(r"[a-z][a-z0-9_-]*", args[0]) and program != ["train.py"]
        sub = [args[0]] if is_sub else []  # a subcommand, not a path or a value
        entries.setdefault((*program, *sub), []).append((page, args))
    return entries


def test_pages_quote_commands():
    programs = {key[0] if key[0] != "-m" else key[1] for key in _entry_points()}
    assert {"train.py", "eval.py", "retrieval"} <= programs, programs


@pytest.mark.parametrize("entry", sorted(_entry_points()), ids=" ".join)
def test_quoted_entry_point_exists(entry):
    """The program and subcommand answer `--help`, and every long flag the pages give them is in that help."""
    result = subprocess.run([sys.executable, *entry, "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{' '.join(entry)} --help failed:\n{result.stderr[-2000:]}"
    known = set(re.findall(r"--[\w-]+", result.stdout))
    for page, args in _entry_points()[entry]:
        for word in args:
            flag = word.split("=", 1)[0]
            if flag.startswith("--"):
                assert flag in known, f"{page}: `{' '.join(entry)}` has no flag {flag}"


def _train_lines() -> list[tuple[str, str, list[str]]]:
    lines = []
    for entry, uses in _entry_points().items():
        if entry == ("train.py",):
            lines += [(page, args[0], [a for a in args[1:] if not a.startswith("-")]) for page, args in uses]
    return lines


def _train_cases():
    return [pytest.param(config, overrides, id=f"{page}: {' '.join([config, *overrides])}")
            for page, config, overrides in _train_lines()]


@pytest.mark.parametrize("config, overrides", _train_cases())
def test_quoted_train_config_loads(config, overrides):
    """`train.py CONFIG key=value ...`: the file exists and the overrides load and check as train.py checks them
    before loading a model (the PEFT method's fields included); nothing is trained."""
    from retrotune.config import load_config
    from retrotune.preflight import check_peft

    assert (ROOT / config).is_file(), f"{config} does not exist"
    run = load_config(str(ROOT / config), overrides)
    if run.stage == "finetune":
        check_peft(run.peft)


def test_quoted_eval_configs_exist():
    for entry, uses in _entry_points().items():
        if entry[0] == "eval.py" and entry[1:] in (("experiment",), ("paper",), ("zero-shot",)):
            for page, args in uses:
                assert (ROOT / args[1]).is_file(), f"{page}: {args[1]} does not exist"


def _make_targets() -> list[tuple[str, list[str]]]:
    return [(page, argv[1:]) for page, argv in _quoted_commands() if argv[0] == "make"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_quoted_make_targets_exist():
    targets = {tuple(args) for _, args in _make_targets()}
    assert ("demo",) in targets and ("test",) in targets, targets
    for args in sorted(targets):
        result = subprocess.run(["make", "-n", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"make {' '.join(args)}: {result.stderr}"
