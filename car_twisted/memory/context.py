"""
Context assembly: the sections of ``build_context`` fitted into a token
budget.

Sections are shown in a fixed order (Identity, Constraints, Facts,
Conversation, Environment, Known Unknowns) but filled in priority order:
Constraints first, then Identity, Facts (best first), Conversation (newest
first), Environment and Known Unknowns.  Each item is one line
(``- subject: body``, newlines folded to spaces) taken whole or not at
all: an item that does not fit in what is left is skipped and the next one
tried, so lower-priority sections and items are the ones cut and no line is
ever cut in half.  A section appears only if at least one of its items
fits, together with its heading.

Budget: ~4 characters per token, so the text is at most
``4 * budget_tokens`` characters (``len(text) <= 4 * budget_tokens``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from car_twisted.memory.model import Fact

__all__ = ["CHARS_PER_TOKEN", "MAX_ITEMS_PER_SECTION", "Section", "assemble", "fact_line"]

CHARS_PER_TOKEN = 4
# Items looked at per section, whatever the budget: bounds the work of one
# call on a graph with very many facts of one kind.
MAX_ITEMS_PER_SECTION = 2000
SEPARATOR = "\n\n"


@attrs.frozen
class Section:
    """One section: its title, and its items in the order they are offered to the budget."""

    title: str
    items: Sequence[Fact]
    #: Show the chosen items in the reverse of the order they were offered
    #: (Conversation: offered newest first, shown newest last).
    reverse: bool = False


def fact_line(fact: Fact) -> str:
    """A fact as one context line."""
    subject = " ".join(fact.subject.split())
    body = " ".join(fact.body.split())
    if subject and body:
        return f"- {subject}: {body}"
    return f"- {subject or body}"


def _fill(sections: Iterable[Section], budget_chars: int) -> dict[str, list[str]]:
    # The first section has no separator before it: start with its share.
    left = budget_chars + len(SEPARATOR)
    chosen: dict[str, list[str]] = {}
    seen: set[str] = set()
    for section in sections:
        heading = len(f"## {section.title}") + len(SEPARATOR)
        lines: list[str] = []
        for fact in section.items[:MAX_ITEMS_PER_SECTION]:
            if left <= 2:
                break
            if fact.id in seen:
                continue
            line = fact_line(fact)
            cost = len(line) + 1 + (0 if lines else heading)
            if cost <= left:
                lines.append(line)
                seen.add(fact.id)
                left -= cost
        if lines:
            chosen[section.title] = lines[::-1] if section.reverse else lines
    return chosen


def assemble(shown: Sequence[Section], priority: Sequence[str], budget_tokens: int) -> str:
    """
    The context text: C{shown} sections in their order, filled in the
    order of the titles in C{priority}, within C{budget_tokens}.  A fact
    offered by two sections is shown once, in the one filled first.
    """
    budget_chars = max(0, budget_tokens) * CHARS_PER_TOKEN
    by_title = {section.title: section for section in shown}
    chosen = _fill((by_title[title] for title in priority if title in by_title), budget_chars)
    parts = [f"## {section.title}\n" + "\n".join(chosen[section.title]) for section in shown if section.title in chosen]
    return SEPARATOR.join(parts)
