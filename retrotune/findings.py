"""From result rows with per-question scores to what a study can claim: rows aggregated over seeds with their 95%
intervals, paired comparisons, and a verdict on each finding of Ficek et al. (2024).

A row in, as the experiment builds it: model, method, train_size, seed, trainable_parameters, train_seconds, and
`questions` (retrotune.scores: per condition, per-question EM/F1/ROUGE-L). A row out (`aggregate`): one per
(model, method, train size), the means over seeds of each score, `<metric>_ci` (95% interval over questions of the
per-question seed means), `<metric>_sd` (spread across seeds), the control scores, and the retrieval gain (F1 with
true minus shuffled neighbours, paired per question) with its interval.

Comparisons are paired per question on the same evaluation set (retrotune.stats.paired): a difference counts as a
finding only when its 95% interval excludes 0.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from retrotune import stats
from retrotune.config import ConfigError
from retrotune.scores import METRICS, vector

GPT, RETRO = "GPT + neighbours in prompt", "RETRO"
EQUIVALENCE_MARGIN = 2.0  # F1 points: "equivalent" only if the whole 95% interval of the difference lies within


def model_kind(label: str) -> str:
    if label.startswith("RETRO"):
        return "retro"
    return "gpt_closed_book" if "no retrieval" in label else "gpt"


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows of one experiment -> one row per (model, method, train size) with seeds aggregated and intervals."""
    groups: OrderedDict = OrderedDict()
    for row in rows:
        groups.setdefault((row["model"], row["method"], row.get("train_size")), []).append(row)
    out = []
    for (model, method, size), members in groups.items():
        ids = members[0]["questions"]["ids"]
        for other in members[1:]:
            if other["questions"]["ids"] != ids:
                raise ValueError(f"{model} {method}: its seeds were scored on different questions; evaluate every "
                                 f"seed on the same evaluation set")
        row = {"model": model, "method": method, "train_size": size, "kind": model_kind(model),
               "seeds": [m.get("seed") for m in members], "n": len(ids),
               "trainable_parameters": max(m.get("trainable_parameters") or 0 for m in members),
               "train_seconds": float(np.mean([m.get("train_seconds") or 0.0 for m in members])),
               "seconds_per_question": _mean_of(members, "seconds_per_question"),
               "wall_seconds": _mean_of(members, "wall_seconds"),
               "neighbours_cut": _mean_of(members, "neighbours_cut"),
               "answer_recall": members[0].get("answer_recall"),
               "peft": members[0].get("peft"), "train": members[0].get("train"),
               "per_question": {}}
        for condition in ("true", "shuffled", "none"):
            for metric in METRICS:
                per_seed = [vector(m["questions"], condition, metric) for m in members]
                if any(v is None for v in per_seed):
                    continue
                summary = stats.over_seeds(np.stack(per_seed))
                row["per_question"][(condition, metric)] = summary.per_question
                key = metric if condition == "true" else f"{metric}_{condition}"
                row[key], row[f"{key}_ci"], row[f"{key}_sd"] = summary.mean, [summary.low, summary.high], summary.spread
        if ("shuffled", "f1") in row["per_question"]:
            gain = stats.paired(row["per_question"][("true", "f1")], row["per_question"][("shuffled", "f1")])
            row["retrieval_gain_f1"], row["retrieval_gain_f1_ci"] = gain.difference, [gain.low, gain.high]
        out.append(row)
    return out


def _mean_of(members: list[dict], key: str):
    values = [m[key] for m in members if m.get(key) is not None]
    return float(np.mean(values)) if values else None


def _f1(row: dict) -> np.ndarray:
    return row["per_question"][("true", "f1")]


def _find(rows: list[dict], kind: str, method: str, size=None) -> dict | None:
    for row in rows:
        if row["kind"] == kind and row["method"] == method and (method == "zero-shot" or row["train_size"] == size):
            return row
    return None


def comparisons(rows: list[dict]) -> list[dict]:
    """The named comparisons, F1 paired per question: RETRO vs GPT under each method (zero-shot included), and each
    method vs LoRA under the same model and training-set size."""
    out = []
    sizes = list(OrderedDict.fromkeys(r["train_size"] for r in rows if r["method"] != "zero-shot"))
    methods = list(OrderedDict.fromkeys(r["method"] for r in rows))
    for method in methods:
        for size in ([None] if method == "zero-shot" else sizes):
            retro, gpt = _find(rows, "retro", method, size), _find(rows, "gpt", method, size)
            if retro and gpt:
                out.append(_compare("RETRO - GPT", method, size, retro, gpt))
    for kind in ("gpt", "retro"):
        for size in sizes:
            lora = _find(rows, kind, "lora", size)
            for method in methods:
                other = _find(rows, kind, method, size)
                if lora and other and method not in ("lora", "zero-shot"):
                    out.append(_compare(f"{method} - lora", kind, size, other, lora))
    return out


def _compare(name: str, scope: str, size, a: dict, b: dict) -> dict:
    result = stats.paired(_f1(a), _f1(b))
    return {"comparison": name, "scope": scope, "train_size": size, "a": f"{a['model']} / {a['method']}",
            "b": f"{b['model']} / {b['method']}", **result.as_dict(), "separated": result.separated}


def _verdict(result: stats.Paired, positive: str = "supported", negative: str = "contradicted") -> str:
    if not result.separated:
        return "inconclusive"
    return positive if result.difference > 0 else negative


def _loretta_verdict(result: stats.Paired) -> tuple[str, str]:
    """Finding 4 (LoRETTA matches LoRA at far fewer parameters): supported when the difference is shown to lie within
    the equivalence margin, or to favour LoRETTA (no loss, and more); contradicted when LoRETTA is shown to be
    behind by more than the margin allows; inconclusive otherwise."""
    margin = EQUIVALENCE_MARGIN
    if result.within(margin):
        return "supported", f"equivalent: the interval lies within +-{margin:g} F1"
    if result.low > 0:
        return "supported", "not equivalent but ahead: the interval lies above 0"
    if result.high < 0:
        return "contradicted", f"behind: the interval lies below 0 and reaches past -{margin:g} F1"
    return "inconclusive", f"the interval crosses 0 and reaches past +-{margin:g} F1"


def _fmt(result: stats.Paired) -> str:
    return (f"{result.difference:+.1f} F1, 95% CI [{result.low:+.1f}, {result.high:+.1f}], "
            f"permutation p = {result.p_value:.3f}, n = {result.n}")


def paper_findings(rows: list[dict]) -> list[dict]:
    """The four findings of Ficek et al. (2024), each decided by a paired test on the evaluation questions:
    1. RETRO ahead zero-shot: RETRO zero-shot minus GPT + neighbours zero-shot.
    2. GPT gains more from PEFT: per method, (GPT tuned - GPT zero-shot) - (RETRO tuned - RETRO zero-shot) per
       question; the verdict pools the methods (the per-question mean of that difference over methods).
    3. P-tuning lags LoRA and adapters: P-tuning minus the better (by mean F1) of LoRA and adapters, on each model.
    4. LoRETTA ~ LoRA at far fewer parameters: LoRETTA minus LoRA, "equivalent" only if the whole interval lies
       within +-2 F1 (supported; so is an interval above 0: no loss at all), with the ratio of trainable parameters.
    A finding whose rows the study lacks is reported as not measured."""
    size = next((r["train_size"] for r in rows if r["method"] == "lora"), None)
    out = []

    retro0, gpt0 = _find(rows, "retro", "zero-shot"), _find(rows, "gpt", "zero-shot")
    if retro0 and gpt0:
        result = stats.paired(_f1(retro0), _f1(gpt0))
        out.append({"finding": "1. RETRO is ahead of GPT + neighbours zero-shot", "verdict": _verdict(result),
                    "test": "RETRO zero-shot - GPT + neighbours zero-shot", "detail": _fmt(result),
                    **result.as_dict()})
    else:
        out.append({"finding": "1. RETRO is ahead of GPT + neighbours zero-shot", "verdict": "not measured"})

    per_method, differences = [], []
    methods = [r["method"] for r in rows if r["kind"] == "gpt" and r["method"] != "zero-shot"
               and r["train_size"] == size]
    for method in methods:
        gpt, retro = _find(rows, "gpt", method, size), _find(rows, "retro", method, size)
        if gpt and retro and gpt0 and retro0:
            diff = (_f1(gpt) - _f1(gpt0)) - (_f1(retro) - _f1(retro0))
            differences.append(diff)
            result = stats.paired(diff, np.zeros_like(diff))
            per_method.append(f"{method}: {_fmt(result)}")
    if differences:
        result = stats.paired(np.mean(differences, axis=0), np.zeros_like(differences[0]))
        out.append({"finding": "2. GPT gains more from PEFT than RETRO", "verdict": _verdict(result),
                    "test": "(GPT tuned - GPT zero-shot) - (RETRO tuned - RETRO zero-shot), mean over "
                            f"{len(differences)} methods", "detail": _fmt(result), "per_method": per_method,
                    **result.as_dict()})
    else:
        out.append({"finding": "2. GPT gains more from PEFT than RETRO", "verdict": "not measured"})

    for kind in ("gpt", "retro"):
        name = f"3. P-tuning lags LoRA and adapters ({'GPT' if kind == 'gpt' else 'RETRO'})"
        ptuning = _find(rows, kind, "ptuning", size)
        rivals = [r for r in (_find(rows, kind, "lora", size), _find(rows, kind, "adapter", size)) if r]
        if not ptuning or not rivals:
            out.append({"finding": name, "verdict": "not measured"})
            continue
        best = max(rivals, key=lambda r: r["f1"])
        result = stats.paired(_f1(ptuning), _f1(best))
        out.append({"finding": name, "verdict": _verdict(result, "contradicted", "supported"),
                    "test": f"P-tuning - {best['method']} (the better of LoRA and adapters)", "detail": _fmt(result),
                    **result.as_dict()})

    for kind in ("gpt", "retro"):
        lora = _find(rows, kind, "lora", size)
        for variant in ("loretta_adp", "loretta_rep"):
            name = f"4. {variant} ~ LoRA at far fewer parameters ({'GPT' if kind == 'gpt' else 'RETRO'})"
            loretta = _find(rows, kind, variant, size)
            if not lora or not loretta:
                out.append({"finding": name, "verdict": "not measured"})
                continue
            result = stats.paired(_f1(loretta), _f1(lora))
            verdict, reading = _loretta_verdict(result)
            ratio = loretta["trainable_parameters"] / max(lora["trainable_parameters"], 1)
            out.append({"finding": name, "verdict": verdict, "test": f"{variant} - lora, equivalent if the 95% "
                        f"interval lies within +-{EQUIVALENCE_MARGIN:g} F1", "detail": f"{_fmt(result)}; "
                        f"{reading}; parameters {ratio:.3f}x LoRA's", "parameter_ratio": ratio, **result.as_dict()})
    return out


def compare_records(first: dict, second: dict, metric: str = "f1") -> dict:
    """Two recorded rows (`scores.read_record` pairs' question columns, named) compared question by question on
    the same questions: the paired difference of their scores, and of their retrieval gains where both have the
    shuffled control. `first`/`second`: {"name": ..., "questions": ...}."""
    a, b = first["questions"], second["questions"]
    if a["ids"] != b["ids"]:
        only = sorted(set(a["ids"]) ^ set(b["ids"]))
        why = f"{len(only)} question(s) in one only, e.g. {only[:3]}" if only else "the same questions in another order"
        raise ConfigError(f"{first['name']} and {second['name']} were scored on different questions ({why}); a paired "
                          f"comparison needs both rows evaluated on the same evaluation set")
    out = {"metric": metric, "n": len(a["ids"])}
    score_a, score_b = vector(a, "true", metric), vector(b, "true", metric)
    if score_a is None or score_b is None:
        raise ConfigError(f"{first['name'] if score_a is None else second['name']} has no {metric!r} scores")
    out["score"] = stats.paired(score_a, score_b)
    shuffled_a, shuffled_b = vector(a, "shuffled", metric), vector(b, "shuffled", metric)
    if shuffled_a is not None and shuffled_b is not None:
        out["retrieval_gain"] = stats.paired(score_a - shuffled_a, score_b - shuffled_b)
    return out
