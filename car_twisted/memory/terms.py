"""
The terms that link facts in the memory graph, and the text helpers the
engine shares with proactive memory.

A fact's terms come from its subject, body and tags:

- **Words**: runs of letters and digits, lowercased (``str.casefold``),
  two characters or more (a lone digit counts), at most
  ``MAX_TERM_CHARS`` long; the words of a small English stopword list
  (``STOPWORDS``: articles, pronouns, auxiliaries, common prepositions and
  question words) are dropped.  There is no stemming: ``work`` and
  ``works`` are different terms, which keeps entity names (``Paris``)
  intact.
- **Compound words**: ``config.json``, ``api-key`` and ``src/app.py`` are a
  term as a whole besides their parts, so a file or flag name links facts
  that spell it the same way.
- **Entities**: two or more adjacent capitalised words (``New York``,
  ``Alice Smith``) are one extra term, lowercased and space-joined
  (``new york``), besides each word.  A single capitalised word is just its
  word, so sentence-initial capitals cost nothing.
- **Tags**: each tag is a term as a whole (``#deploy``), plus its words.

Terms are kept in first-seen order and capped at ``MAX_TERMS_PER_FACT``
from the first ``MAX_TOKENISED_CHARS`` characters of the text, so adding a
fact costs a bounded amount whatever its size.  A query is tokenised the
same way (without tags), capped at ``MAX_QUERY_TERMS``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "MAX_QUERY_TERMS",
    "MAX_TERMS_PER_FACT",
    "MAX_TOKENISED_CHARS",
    "STOPWORDS",
    "fact_terms",
    "normalise_text",
    "query_terms",
]

MAX_TERM_CHARS = 64
MAX_TERMS_PER_FACT = 128
MAX_QUERY_TERMS = 64
MAX_TOKENISED_CHARS = 8192

STOPWORDS = frozenset(
    """
    a an the and or but nor so yet if then than else
    is am are was were be been being do does did doing done have has had having
    will would shall should can could may might
    i me my mine myself you your yours yourself he him his himself she her hers herself
    it its itself we us our ours ourselves they them their theirs themselves
    this that these those there here
    what which who whom whose when where why how
    at by for from in into of on onto to with within without about above below
    over under between through during before after up down out off again
    as also too very just only own same such both each few more most other some any all
    no not
    """.split()
)

# A word: letters/digits, optionally joined to more by . - / ' (a compound).
_WORD = re.compile(r"[^\W_]+(?:[./'\-][^\W_]+)*")
_PART = re.compile(r"[^\W_]+")
_SPACE = re.compile(r"\s+")


def _keep(word: str) -> bool:
    if len(word) > MAX_TERM_CHARS:
        return False
    if len(word) < 2 and not word.isdigit():
        return False
    return word not in STOPWORDS


def _collect(text: str, out: dict[str, None], limit: int) -> None:
    """Add C{text}'s terms to C{out} (an ordered set) until it holds C{limit}."""
    run: list[str] = []  # the current run of capitalised words

    def close_run() -> None:
        if len(run) >= 2:
            entity = " ".join(run).casefold()
            if len(entity) <= MAX_TERM_CHARS:
                out.setdefault(entity, None)
        run.clear()

    last_end = -1
    for match in _WORD.finditer(text[:MAX_TOKENISED_CHARS]):
        if len(out) >= limit:
            return
        token = match.group()
        # An entity run is broken by anything but plain spaces between words
        # ("Acme, Paris" is two things, "Acme Paris" may be one).
        if run and (match.start() - last_end > 1 or text[last_end] != " "):
            close_run()
        last_end = match.end()
        if token[0].isupper() and _PART.fullmatch(token):
            run.append(token)
        else:
            close_run()
        word = token.casefold()
        if _PART.fullmatch(word):
            if _keep(word):
                out.setdefault(word, None)
            continue
        # A compound: the whole (not for a possessive or contraction), then its parts.
        if "'" not in word and len(word) <= MAX_TERM_CHARS:
            out.setdefault(word, None)
        for part in _PART.findall(word):
            if len(out) >= limit:
                return
            if _keep(part):
                out.setdefault(part, None)
    if len(out) < limit:
        close_run()


def fact_terms(subject: str, body: str, tags: Iterable[str] = ()) -> list[str]:
    """A fact's terms, in first-seen order (subject, body, then tags)."""
    out: dict[str, None] = {}
    _collect(subject, out, MAX_TERMS_PER_FACT)
    _collect(body, out, MAX_TERMS_PER_FACT)
    for tag in tags:
        if len(out) >= MAX_TERMS_PER_FACT:
            break
        whole = tag.strip().casefold()
        if whole and len(whole) < MAX_TERM_CHARS:
            out.setdefault("#" + whole, None)
        _collect(tag, out, MAX_TERMS_PER_FACT)
    return list(out)


def query_terms(text: str) -> list[str]:
    """The terms of a query, in first-seen order."""
    out: dict[str, None] = {}
    _collect(text, out, MAX_QUERY_TERMS)
    return list(out)


def normalise_text(text: str) -> str:
    """C{text} for duplicate detection: casefolded, whitespace collapsed, trailing punctuation dropped."""
    return _SPACE.sub(" ", text.casefold()).strip().rstrip(".!?;:, ")
