"""Run the benchmark scripts and gather their markdown into one report.

Takes the scripts `benchmarks/bench_*.py` (each prints a markdown section, `## title` and a table, on stdout and its
progress on stderr, and accepts `--tiny`); gives `benchmarks/RESULTS.md` (full-size runs) or the same report on
stdout / `--out` (`--tiny` runs), headed by a description of the machine. Each script runs in its own process, so a
crash, a memory peak or a conflicting import in one cannot touch the others; a failed script becomes a failed row.

    python -m benchmarks                      # everything, full size -> benchmarks/RESULTS.md
    python -m benchmarks --tiny               # everything at toy size -> stdout
    python -m benchmarks --only retro_pytorch --only lora_memory
"""
from __future__ import annotations

import argparse
import ast
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from benchmarks import md_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"


@dataclass
class Outcome:
    name: str
    status: str  # "ok" or "failed (...)"
    seconds: float
    section: str  # the markdown the script printed, or the failure's stderr tail


def discover() -> list[str]:
    """Module names (`bench_x`) of every benchmark script, sorted."""
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def select(available: list[str], only: list[str] | None) -> list[str]:
    if not only:
        return available
    wanted = [w.strip() for item in only for w in item.split(",") if w.strip()]
    chosen = []
    for w in wanted:
        stem = Path(w).stem
        stem = stem if stem.startswith("bench_") else f"bench_{stem}"
        if stem not in available:
            names = ", ".join(s.removeprefix("bench_") for s in available) or "(none found)"
            raise SystemExit(f"--only {w!r}: no benchmarks/{stem}.py; available: {names}")
        if stem not in chosen:
            chosen.append(stem)
    return chosen


def _pump(stream, sink, keep: list[bytes]) -> None:
    """Copy a child's stderr through as it comes (progress bars stay live) and keep it for a failure report."""
    for block in iter(lambda: stream.read1(4096), b""):
        keep.append(block)
        try:
            sink.write(block)
            sink.flush()
        except (OSError, ValueError):  # a closed or replaced stderr must not cost us the failure report
            pass


class _TextSink:
    """Bytes in, text out: for a sys.stderr without a binary buffer (as under pytest's capture)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, block: bytes) -> None:
        self.stream.write(block.decode(errors="replace"))

    def flush(self) -> None:
        self.stream.flush()


def _source_facts(name: str) -> tuple[str, bool]:
    """The first line of a script's docstring (a title for scripts that print bare table rows) and whether it offers
    `--header` (scripts that print rows only print their table header when asked)."""
    path = HERE / f"{name}.py"
    try:
        source = path.read_text()
        doc = ast.get_docstring(ast.parse(source)) or ""
    except (OSError, SyntaxError):
        return "", False
    first_paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    return first_paragraph, '"--header"' in source


def run_one(name: str, tiny: bool, timeout: float | None) -> Outcome:
    title, takes_header = _source_facts(name)
    cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--tiny"] if tiny else []) + \
        (["--header"] if takes_header else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print(f"[benchmarks] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group, so a timeout also stops its workers
    err: list[bytes] = []
    out: list[bytes] = []
    sink = getattr(sys.stderr, "buffer", None) or _TextSink(sys.stderr)
    # Two readers, not communicate(): communicate would drain stderr itself and the progress would not show.
    readers = [threading.Thread(target=_pump, args=(proc.stderr, sink, err), daemon=True),
               threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)]
    for r in readers:
        r.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    for r in readers:
        r.join(timeout=10)
    seconds = time.perf_counter() - t0
    text = b"".join(out).decode(errors="replace").strip()
    if code == 0 and text:
        if not any(line.startswith("## ") for line in text.splitlines()):
            text = f"## {name}: {title}\n\n{text}" if title else f"## {name}\n\n{text}"
        return Outcome(name, "ok", seconds, text)
    if code == 0:
        status = "failed (printed no markdown)"
    elif code is None:
        status = f"failed (timed out after {timeout:.0f} s)"
    else:
        status = f"failed (exit {code})"
    tail = b"".join(err).decode(errors="replace").replace("\r", "\n").strip().splitlines()[-20:]
    body = "\n".join(tail) or "(no stderr)"
    section = f"## {name}: {status}\n\nLast lines of its stderr (`{' '.join(cmd[1:])}` to reproduce):\n\n" \
              f"```\n{body}\n```"
    return Outcome(name, status, seconds, section)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    try:
        import psutil

        return f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return f"{pages * size / 2**30:.1f} GiB"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine() -> list[tuple[str, str]]:
    import torch

    cuda = "none"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cuda = f"{props.name}, {props.total_memory / 2**30:.0f} GiB (CUDA {torch.version.cuda})"
    try:
        import psutil

        cores = f"{psutil.cpu_count(logical=False)} physical / {psutil.cpu_count()} logical"
    except ImportError:
        cores = f"{os.cpu_count()} logical"
    return [
        ("CPU", _cpu_model()),
        ("cores", f"{cores}; torch's default {torch.get_num_threads()} threads (each script states what it uses)"),
        ("RAM", _ram_gib()),
        ("CUDA device", cuda),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("torch / transformers / peft", f"{torch.__version__} / {_version('transformers')} / {_version('peft')}"),
        ("commit", _git_commit()),
    ]


def report(outcomes: list[Outcome], tiny: bool, left_out: list[str]) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    size = "tiny (smoke) sizes: the numbers say nothing about speed" if tiny else "full sizes"
    parts = [
        "# retrotune benchmarks",
        f"Run {when} with `python -m benchmarks{' --tiny' if tiny else ''}`, {size}. Every figure is a ratio "
        "against a reference measured in the same run, or a memory peak; absolute times are context for this machine "
        "only. See benchmarks/README.md for what each benchmark answers and how to read it.",
        "## Machine",
        md_table(["", ""], machine()),
        "## Scripts",
        md_table(["benchmark", "status", "wall time (s)"],
                 [(o.name, o.status, f"{o.seconds:.0f}") for o in outcomes]),
    ]
    if left_out:
        parts.append("Not run in this invocation: " + ", ".join(left_out) + ".")
    parts += [o.section for o in outcomes]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a smoke run); prints instead of writing RESULTS.md")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="run only these benchmarks (repeat or comma-separate; 'retro_pytorch' or "
                         "'bench_retro_pytorch')")
    ap.add_argument("--out", type=Path, help="write the report here (default: benchmarks/RESULTS.md on full runs, "
                                             "stdout with --tiny)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds one script may run before it is stopped and reported failed "
                         "(default: 300 with --tiny, 1800 otherwise)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)

    available = discover()
    if args.list:
        print("\n".join(s.removeprefix("bench_") for s in available))
        return 0
    chosen = select(available, args.only)
    if not chosen:
        raise SystemExit(f"no benchmarks/bench_*.py found in {HERE}")
    timeout = args.timeout or (300.0 if args.tiny else 1800.0)
    outcomes = [run_one(name, args.tiny, timeout) for name in chosen]
    text = report(outcomes, args.tiny, [s for s in available if s not in chosen])

    out = args.out or (None if args.tiny else RESULTS)
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"[benchmarks] wrote {out}", file=sys.stderr)
    failed = [o.name for o in outcomes if o.status != "ok"]
    if failed:
        print(f"[benchmarks] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
