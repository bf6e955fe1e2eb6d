"""Prompt templates per task: an example -> the text the model is asked (the user turn of a chat template, or the
prompt before 'Answer:'), and -> the answer it is trained to give.

Both models read the same task prompt. The GPT baseline gets the retrieved passages written before it
(`retro.qa.gpt_prompt`: '[1] passage ...' then the prompt); RETRO gets the prompt alone, left-padded to end on a
chunk boundary, so that the answer begins a new chunk and every chunk reads the neighbours through cross-attention
(`retro.qa.qa_layout`). The loss is on the answer tokens only.
"""
from __future__ import annotations

from retrotune.qa import QAExample

LETTERS = "ABCDEFGH"


def question(example: QAExample) -> str:
    return f"Question: {example.question.strip()}"


def multiple_choice(example: QAExample) -> str:
    options = "\n".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(example.options))
    return f"Question: {example.question.strip()}\n{options}\nAnswer with the letter of the correct option."


def summary(example: QAExample) -> str:
    return f"Summarise what the meeting says about this: {example.question.strip()}"


def first_answer(example: QAExample) -> str:
    return example.answers[0]


def option_text(options, index: int) -> str:
    """An option as the model answers it: '(B) the option's text'."""
    return f"({LETTERS[index]}) {options[index]}"


def option_answer(example: QAExample) -> str:
    if example.label is None:
        raise ValueError(f"example {example.id}: no gold option (a test split?); it can be evaluated, not trained on")
    return option_text(example.options, example.label)
