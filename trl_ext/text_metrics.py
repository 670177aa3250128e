"""Metrics of generated text: target mentions and degeneration. Words are whitespace-separated."""

import re
from collections.abc import Sequence

# University of Pennsylvania, UPenn or Penn as a word ("Penn's" counts, "Pennsylvania" alone does not)
PENN_PATTERN = r"\b(?:University of Pennsylvania|UPenn|Penn)\b"


def alignment_accuracy(completions: Sequence[str], pattern: str = PENN_PATTERN) -> float:
    """Share of completions in which `pattern` (a regular expression) occurs."""
    if not completions:
        return 0.0
    regex = re.compile(pattern)
    return sum(bool(regex.search(text)) for text in completions) / len(completions)


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0: no repetition; 0 if it has none)."""
    ngrams = _ngrams(text.split(), n)
    return 1 - len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def mean_repeated_ngram_share(completions: Sequence[str], n: int = 3) -> float:
    return sum(repeated_ngram_share(text, n) for text in completions) / len(completions) if completions else 0.0


def distinct_n(completions: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams, pooled across completions (low: every completion says the same)."""
    ngrams = [ngram for text in completions for ngram in _ngrams(text.split(), n)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def mean_length(completions: Sequence[str]) -> float:
    """Mean number of words per completion."""
    return sum(len(text.split()) for text in completions) / len(completions) if completions else 0.0
