"""`eval.py compare`: two recorded rows, paired question by question."""
import eval as eval_cli
from retrotune.scores import write_record


def record(path, ids, true, shuffled=None):
    questions = {"ids": ids, "true": {"prediction": [""] * len(ids), "f1": true}}
    if shuffled is not None:
        questions["shuffled"] = {"prediction": [""] * len(ids), "f1": shuffled}
    write_record(path, {"name": path.stem}, questions)
    return str(path)


def test_a_known_shift_and_its_retrieval_gain(tmp_path, capsys):
    ids = [str(i) for i in range(40)]
    base = [float(i % 7) * 10 for i in range(40)]
    a = record(tmp_path / "a.json", ids, [s + 5 for s in base], [s + 5 for s in base])  # reads nothing
    b = record(tmp_path / "b.json", ids, base, [s - 3 for s in base])  # gains 3 from its neighbours
    assert eval_cli.main(["compare", a, b]) == 0
    score, gain = capsys.readouterr().out.splitlines()
    assert score.startswith("score (f1), a - b: +5.0 [+5.0, +5.0], permutation p = 0.000, n = 40")
    assert gain.startswith("retrieval gain (f1), a - b: -3.0 [-3.0, -3.0]")


def test_rows_scored_on_other_questions_are_refused(tmp_path, capsys):
    a = record(tmp_path / "a.json", ["1", "2", "3"], [1.0, 2.0, 3.0])
    b = record(tmp_path / "b.json", ["1", "2", "4"], [1.0, 2.0, 3.0])
    assert eval_cli.main(["compare", a, b]) == 2
    err = capsys.readouterr().err
    assert "a and b were scored on different questions (2 question(s) in one only, e.g. ['3', '4'])" in err


def test_a_file_that_is_not_a_recorded_row_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    assert eval_cli.main(["compare", str(bad), str(bad)]) == 2
    assert "bad.json: not a recorded row" in capsys.readouterr().err
