"""The retrieval-gain controls: shuffled neighbours come from another question (of another article where there is
one) and 'none' removes them, for RETRO's tokens and GPT's texts alike; the table shows the gain."""
import numpy as np

from retrotune.runs import control_records, donors, shuffled_sequences


def records(groups):
    return [{"id": str(i), "question": f"q{i}", "answers": [f"a{i}"], "group": g,
             "neighbour_tokens": np.full((2, 4), i), "neighbour_texts": [f"text {i}", f"more {i}"]}
            for i, g in enumerate(groups)]


def test_donors_are_others_and_from_another_group_where_possible():
    groups = ["A"] * 5 + ["B"] * 5
    donor = donors(groups)
    assert sorted(donor) == list(range(10))  # a permutation: every neighbour set is used once
    assert all(d != i for i, d in enumerate(donor))
    assert all(groups[d] != groups[i] for i, d in enumerate(donor))
    assert donors(["A"]) == [0] and donors(["A", "A"]) == [1, 0]


def test_shuffled_control_moves_tokens_and_texts_together():
    recs = records(["A", "A", "B", "B"])
    shuffled = control_records(recs, "shuffled")
    for before, after in zip(recs, shuffled):
        assert after["question"] == before["question"] and after["answers"] == before["answers"]
        donor = int(after["neighbour_tokens"][0, 0])
        assert donor != int(before["id"]) and recs[donor]["group"] != before["group"]
        assert after["neighbour_texts"] == recs[donor]["neighbour_texts"]
    assert all((r["neighbour_tokens"] == int(r["id"])).all() for r in recs)  # the originals are untouched


def test_none_control_removes_every_neighbour():
    none = control_records(records(["A", "B"]), "none")
    assert all((r["neighbour_tokens"] == -1).all() and r["neighbour_texts"] == [] for r in none)


def test_shuffled_sequences_keep_their_own_chunk_count():
    items = [{"tokens": np.arange(8 * n), "neighbours": np.full((n, 2, 4), n)} for n in (1, 3, 2)]
    out = shuffled_sequences(items)
    for item, moved in zip(items, out):
        assert moved["neighbours"].shape == item["neighbours"].shape
        assert not np.array_equal(moved["neighbours"], item["neighbours"])
        assert (moved["tokens"] == item["tokens"]).all()


def test_table_shows_controls_gain_and_intervals():
    from retrotune.experiment import markdown_table

    row = {"model": "RETRO", "method": "lora", "train_size": 10, "seeds": [0, 1], "n": 400,
           "trainable_parameters": 5, "train_seconds": 60, "seconds_per_question": 0.25,
           "em": 10.0, "em_ci": [7.0, 13.0], "f1": 30.0, "f1_ci": [26.0, 34.0], "f1_sd": 1.5, "rouge_l": 31.0,
           "answer_recall": 70.0, "f1_shuffled": 17.5, "f1_none": 15.0, "retrieval_gain_f1": 12.5,
           "retrieval_gain_f1_ci": [9.0, 16.0]}
    line = markdown_table([row]).splitlines()[-1]
    assert line.startswith("| RETRO | lora | 10 | 2 | 400 | 5 | 1.0 min | - | 0.25 | 10.0 [7.0, 13.0]")
    assert "| 30.0 [26.0, 34.0] ±1.5 |" in line  # two seeds: the spread across them
    assert line.endswith("| 70.0 | 17.5 | 15.0 | +12.5 [+9.0, +16.0] |")
