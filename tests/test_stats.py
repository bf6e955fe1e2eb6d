"""Intervals, paired tests, seed aggregation and the paper's verdicts, on hand-computed cases."""
import numpy as np
import pytest

from retrotune import findings, stats


def test_constant_scores_give_a_zero_width_interval():
    assert stats.interval([40.0] * 30) == (40.0, 40.0)
    assert stats.interval([7.5]) == (7.5, 7.5)


def test_interval_matches_the_normal_approximation_on_a_known_case():
    values = np.array([0.0] * 200 + [100.0] * 200)  # mean 50, standard error 100 * 0.5 / sqrt(400) = 2.5
    low, high = stats.interval(values)
    assert low == pytest.approx(50 - 1.96 * 2.5, abs=0.8)
    assert high == pytest.approx(50 + 1.96 * 2.5, abs=0.8)
    assert stats.interval(values) == (low, high)  # seeded: the same scores, the same interval


def test_paired_test_finds_a_known_shift_and_not_a_null_one():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, size=300)
    shifted = base + 5 + rng.normal(0, 2, size=300)
    result = stats.paired(shifted, base)
    assert result.difference == pytest.approx(5, abs=0.4)
    assert result.low > 3 and result.high < 7 and result.separated
    assert result.p_value < 0.01
    null = stats.paired(base, base)
    assert (null.difference, null.low, null.high, null.p_value, null.separated) == (0.0, 0.0, 0.0, 1.0, False)
    noise = stats.paired(base + rng.normal(0, 20, size=300), base)
    assert noise.low < 0 < noise.high and not noise.separated and noise.p_value > 0.05
    assert stats.Paired(0.5, -1.0, 1.5, 0.4, 10).within(2.0)
    assert not stats.Paired(0.5, -1.0, 2.5, 0.4, 10).within(2.0)


def test_paired_refuses_vectors_over_other_questions():
    with pytest.raises(ValueError, match="same questions"):
        stats.paired([1.0, 2.0], [1.0, 2.0, 3.0])


def test_seeds_aggregate_as_documented():
    scores = np.array([[10.0, 20.0, 30.0, 40.0],   # seed 0: mean 25
                       [20.0, 30.0, 40.0, 50.0],   # seed 1: mean 35
                       [30.0, 40.0, 50.0, 60.0]])  # seed 2: mean 45
    summary = stats.over_seeds(scores)
    assert summary.mean == pytest.approx(35.0)
    assert summary.spread == pytest.approx(10.0)  # sample standard deviation of 25, 35, 45
    assert summary.per_question.tolist() == [20.0, 30.0, 40.0, 50.0]  # seeds averaged per question first
    assert summary.low <= 35.0 <= summary.high and summary.seeds == 3
    one = stats.over_seeds(scores[:1])
    assert one.spread == 0.0 and one.mean == pytest.approx(25.0)


def _row(model, method, f1, *, shuffled=None, params=0, seed=None, size=None):
    questions = {"ids": [str(i) for i in range(len(f1))], "true": {"f1": list(f1), "em": list(f1), "rouge_l": list(f1)}}
    if shuffled is not None:
        questions["shuffled"] = {"f1": list(shuffled), "em": list(shuffled), "rouge_l": list(shuffled)}
    return {"model": model, "method": method, "train_size": size, "seed": seed, "trainable_parameters": params,
            "train_seconds": 1.0, "questions": questions}


def test_aggregate_puts_seeds_together_with_intervals_and_the_paired_gain():
    ones, zeros = [100.0] * 50 + [0.0] * 50, [0.0] * 100
    rows = [_row("RETRO", "lora", ones, shuffled=zeros, seed=0), _row("RETRO", "lora", ones, shuffled=zeros, seed=1)]
    (row,) = findings.aggregate(rows)
    assert row["seeds"] == [0, 1] and row["n"] == 100 and row["f1"] == 50.0 and row["f1_sd"] == 0.0
    assert row["f1_ci"][0] < 50.0 < row["f1_ci"][1]
    assert row["f1_shuffled"] == 0.0 and row["f1_shuffled_ci"] == [0.0, 0.0]
    assert row["retrieval_gain_f1"] == 50.0 and row["retrieval_gain_f1_ci"][0] > 35.0
    other = _row("RETRO", "lora", ones, seed=2)
    other["questions"]["ids"] = other["questions"]["ids"][::-1]
    with pytest.raises(ValueError, match="different questions"):
        findings.aggregate(rows + [other])


def test_the_four_findings_get_their_verdicts():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 60, size=200)
    noise = lambda scale: rng.normal(0, scale, size=200)  # noqa: E731
    rows = findings.aggregate([
        _row("GPT + neighbours in prompt", "zero-shot", base),
        _row("RETRO (retro-fitted)", "zero-shot", base + 10 + noise(1)),           # 1: RETRO ahead, clearly
        _row("GPT + neighbours in prompt", "lora", base + 20 + noise(1), params=1000),
        _row("RETRO", "lora", base + 15 + noise(1), params=1000),                   # 2: GPT gains 20, RETRO 5
        _row("GPT + neighbours in prompt", "ptuning", base + 5 + noise(1), params=100),  # 3: P-tuning lags
        _row("RETRO", "ptuning", base + 15 + noise(1), params=100),                 # 3: level with LoRA on RETRO
        _row("GPT + neighbours in prompt", "loretta_rep", base + 20 + noise(0.5), params=100),  # 4: equivalent
        _row("RETRO", "loretta_rep", base + 5 + noise(1), params=100),              # 4: far below LoRA
        _row("GPT + neighbours in prompt", "loretta_adp", base + 30 + noise(1), params=100),  # 4: ahead of LoRA
        _row("RETRO", "loretta_adp", base + 15 + noise(30), params=100),            # 4: too noisy to tell
    ])
    found = {f["finding"]: f for f in findings.paper_findings(rows)}
    verdicts = {name: f["verdict"] for name, f in found.items()}
    assert verdicts["1. RETRO is ahead of GPT + neighbours zero-shot"] == "supported"
    assert verdicts["2. GPT gains more from PEFT than RETRO"] == "supported"
    assert verdicts["3. P-tuning lags LoRA and adapters (GPT)"] == "supported"
    assert verdicts["3. P-tuning lags LoRA and adapters (RETRO)"] == "inconclusive"
    assert verdicts["4. loretta_rep ~ LoRA at far fewer parameters (GPT)"] == "supported"
    assert verdicts["4. loretta_rep ~ LoRA at far fewer parameters (RETRO)"] == "contradicted"
    assert verdicts["4. loretta_adp ~ LoRA at far fewer parameters (GPT)"] == "supported"
    assert "not equivalent but ahead" in found["4. loretta_adp ~ LoRA at far fewer parameters (GPT)"]["detail"]
    assert verdicts["4. loretta_adp ~ LoRA at far fewer parameters (RETRO)"] == "inconclusive"
    assert "equivalent: the interval lies within +-2 F1" in found["4. loretta_rep ~ LoRA at far fewer parameters (GPT)"][
        "detail"]
    without = [row for row in rows if row["method"] != "loretta_adp"]
    assert {f["finding"]: f["verdict"] for f in findings.paper_findings(without)}[
        "4. loretta_adp ~ LoRA at far fewer parameters (GPT)"] == "not measured"
    named = {(c["comparison"], c["scope"]): c for c in findings.comparisons(rows)}
    assert named[("RETRO - GPT", "zero-shot")]["separated"]
    assert named[("RETRO - GPT", "lora")]["difference"] == pytest.approx(-5, abs=0.5)
    assert named[("ptuning - lora", "gpt")]["ci"][1] < 0


def test_the_geometric_mean_interval_resamples_questions_across_its_columns():
    rouge = stats.geometric_mean_of_means
    constant = [[30.0] * 20, [10.0] * 20, [20.0] * 20]
    assert stats.interval_of(rouge, constant) == pytest.approx((6000 ** (1 / 3),) * 2)  # zero width
    assert stats.interval_of(rouge, [[30.0, 50.0], [0.0, 0.0], [20.0, 40.0]]) == (0.0, 0.0)  # a zero mean: score 0
    # two questions, ROUGE-1/2/L (10, 10, 80) and (40, 40, 40): a resample takes the first twice (a quarter of them,
    # score (10 * 10 * 80) ** (1/3) = 20), the second twice (a quarter, 40) or both (the full sample's score,
    # (25 * 25 * 60) ** (1/3) = 33.5), so the 2.5th and 97.5th percentiles are 20 and 40
    columns = [[10.0, 40.0], [10.0, 40.0], [80.0, 40.0]]
    assert float(rouge(*map(np.array, columns))) == pytest.approx(37500 ** (1 / 3))  # not the mean 30 of 20 and 40
    assert stats.interval_of(rouge, columns) == pytest.approx((20.0, 40.0))
    assert stats.interval_of(rouge, columns) == stats.interval_of(rouge, columns)  # seeded
    with pytest.raises(ValueError, match="same questions"):
        stats.interval_of(rouge, [[1.0, 2.0], [1.0]])
