"""SQuAD EM/F1 against values worked out by hand with the official v1.1 rules."""
import pytest

from retrotune.metrics import exact_match, f1_score, normalize_answer, rouge_l, score_answers


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   apple, a pear! ", "apple pear"),
    ("Theatre (the)", "theatre"),
    ("U.S.A.", "usa"),
])
def test_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_articles_punctuation_and_case():
    assert exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0


def test_multiple_gold_answers_take_the_best():
    golds = ["October 1973", "October", "1973"]
    assert exact_match("october", golds) == 1.0
    # "in October 1973": 3 tokens vs gold "October 1973": p = 2/3, r = 1 -> F1 = 0.8
    assert f1_score("in October 1973", golds) == pytest.approx(0.8)


def test_f1_partial_overlap():
    # prediction tokens [san, francisco, bay], gold [san, francisco]: p = 2/3, r = 1, F1 = 0.8
    assert f1_score("San Francisco Bay", ["San Francisco"]) == pytest.approx(0.8)
    # repeated tokens count per occurrence: [x y y] vs [y y z] -> overlap 2, p = r = 2/3
    assert f1_score("x y y", ["y y z"]) == pytest.approx(2 / 3)
    assert f1_score("Paris", ["London"]) == 0.0


def test_empty_after_normalisation():
    assert f1_score("the", ["a"]) == 1.0  # both normalise to nothing, as in the official script
    assert f1_score("the", ["Paris"]) == 0.0


def test_dataset_scores_are_percentages():
    scores = score_answers(["Paris", "Lyon is big"], [["Paris"], ["Marseille"]])
    assert scores["em"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(50.0)
    assert 0 < rouge_l("Paris France", ["Paris"]) < 1
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        score_answers(["a", "b"], [["a"]])
