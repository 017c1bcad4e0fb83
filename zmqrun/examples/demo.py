"""Example jobs for ``zmqrun demo`` and the README.

Each function takes keyword arguments (the job's ``args``) and returns a JSON value.
"""

from __future__ import annotations

import collections
import re


def fibo(n: int = 10) -> int:
    """The n-th Fibonacci number, computed the slow recursive way (Windmill's benchmark job)."""
    return n if n < 2 else fibo(n - 1) + fibo(n - 2)


def words(text: str, top: int = 3) -> dict[str, object]:
    """Count words in ``text``; prints a log line per step and returns the ``top`` most common words."""
    tokens = re.findall(r"[a-z']+", text.lower())
    print(f"tokenized {len(tokens)} words")
    counts = collections.Counter(tokens)
    print(f"{len(counts)} distinct words")
    common = counts.most_common(top)
    print("most common: " + ", ".join(f"{w}={c}" for w, c in common))
    return {"words": len(tokens), "distinct": len(counts), "top": common}


def fail(message: str = "this job fails on purpose") -> None:
    """Raise ValueError(message): shows how a failure and its traceback come back."""
    raise ValueError(message)


def main(**kwargs: object) -> dict[str, object]:
    """Echo the arguments back (the default function of this script)."""
    return {"echo": kwargs}
