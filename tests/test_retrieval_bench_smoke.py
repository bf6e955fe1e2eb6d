"""The two retrieval benchmarks run end to end at --tiny sizes and print a well-formed markdown row."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]


@pytest.mark.parametrize("data", ["sphere", "clustered"])
def test_bench_search_tiny(data, capsys):
    assert load("bench_search").main(["--tiny", "--header", "--data", data]) == 0
    header, row = rows(capsys.readouterr().out)
    result = dict(zip(header, row))
    # above the tiny flat threshold the automatic choice is IVF, unless tuning shows it cannot beat exact search
    assert result["factory"].startswith("IVF") if data == "clustered" else \
        result["factory"] in ("Flat", "IVF256,Flat", "HNSW32")
    assert 0.0 <= float(result["recall@10"]) <= 1.0 and float(result["speed-up"].rstrip("x")) > 0


@pytest.mark.integration
def test_bench_index_build_tiny(capsys):
    assert load("bench_index_build").main(["--tiny", "--header"]) == 0
    header, row = rows(capsys.readouterr().out)
    result = dict(zip(header, row))
    assert int(result["chunks"].replace(",", "")) > 0
    assert float(result["ratio"]) > 0


def test_bench_index_scale_tiny(capsys):
    assert load("bench_index_scale").main(["--tiny"]) == 0
    header, *table = rows(capsys.readouterr().out)
    results = {r[0]: dict(zip(header, r)) for r in table}
    assert set(results) == {"planner", "Flat", "IVF", "HNSW"}
    assert results["planner"]["factory"].endswith("(on disk)")  # 312 KiB of vectors over a 16 KiB budget
    assert float(results["Flat"]["recall@10"]) == 1.0
    for r in results.values():
        assert 0.0 <= float(r["recall@10"]) <= 1.0 if r["recall@10"] != "-" else r["index"] == "HNSW"


def test_bench_coarse_assignment_tiny(capsys):
    assert load("bench_coarse_assignment").main(["--tiny", "--ef", "1", "256"]) == 0
    header, *table = rows(capsys.readouterr().out)
    results = {r[0]: dict(zip(header, r)) for r in table}
    assert list(results) == ["exact (flat)", "HNSW32, efSearch 1", "HNSW32, efSearch 256"]
    right = [float(r["lists right"]) for r in results.values()]
    assert right[0] == 1.0 and 0.0 < right[1] <= 1.0
    assert right[2] >= right[1]  # a walk as wide as the 256 lists cannot do worse than one of width 1
