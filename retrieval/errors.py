"""One error path for the command lines: expected errors (bad input, damaged files, wrong settings) are printed as
one `error: ...` line (what, where, what to do) with exit status 2; anything else is a bug and keeps its traceback.
`--debug` shows the traceback of expected errors too.

Used by `python -m retrieval`, `train.py` and `eval.py` and `python -m retrotune.parameter_table`.
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_USER_ERROR = 2


class FlagError(ValueError):
    """A command-line flag with a value the command cannot use (decided before anything is loaded)."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """The retrieval package's user-facing errors, plus file-system ones (a missing or unreadable path)."""
    from .build import BuildSettingsError
    from .corpus import CorpusError
    from .embed import EmbeddingStateError
    from .integrity import IntegrityError
    from .manifest import RetrievalIndexError

    return (CorpusError, BuildSettingsError, EmbeddingStateError, RetrievalIndexError, IntegrityError, FlagError,
            OSError)


def report(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return f"error: {text}"


def run_cli(func: Callable, args, expected: tuple[type[BaseException], ...], debug: bool = False) -> int:
    """`func(args)`, with expected errors reported as one line and exit status 2 (re-raised when `debug`)."""
    try:
        return func(args)
    except expected as error:
        if debug:
            raise
        print(report(error), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted; rerun the same command to resume from what was saved", file=sys.stderr)
        return 130
