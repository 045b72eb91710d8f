"""Judging an answer (SPEC section 4): is the reference in what the model said?

Correct if a normalised reference answer or alias occurs in the normalised output
(lower case, punctuation and the articles a/an/the removed, whitespace collapsed), as
whole words. ROUGE-L recall >= 0.5 is the second judge. Multiple choice is judged by the
highest LP among the options (see the evaluation stage, which scores with the hot path).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "‘’“”–—"})


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains_match(output: str, references: Iterable[str]) -> bool:
    """True if any normalised reference occurs in the normalised output as whole words."""
    out = f" {normalize(output)} "
    return any(ref and f" {ref} " in out for ref in (normalize(r) for r in references))


def rouge_l_recall(output: str, reference: str) -> float:
    """Longest common subsequence of normalised words / reference length."""
    out, ref = normalize(output).split(), normalize(reference).split()
    if not ref:
        return 0.0
    prev = [0] * (len(out) + 1)
    for r in ref:
        cur = [0]
        for j, o in enumerate(out):
            cur.append(prev[j] + 1 if r == o else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(ref)


def is_correct(
    output: str, answer: str, aliases: Iterable[str] = (), judge: str = "contains"
) -> bool:
    """The project's judge: `contains` (default) or `rouge` (ROUGE-L recall >= 0.5)."""
    references = [answer, *aliases]
    if judge == "contains":
        return contains_match(output, references)
    if judge == "rouge":
        return max(rouge_l_recall(output, r) for r in references) >= 0.5
    raise ValueError(f"unknown judge {judge!r}; choose contains or rouge")
