"""
Which unknown methods are out of this daemon's scope, and why.

A method outside scope (model inference, coder, browser, OS integrations,
Parslee account sign-in, MCP) answers ``-32601`` saying it is not
implemented by this daemon, never a fake result.  Any other unknown
method is simply "method not found".
"""

from __future__ import annotations

__all__ = ["out_of_scope_reason"]

_INFERENCE = "model inference is out of this daemon's scope"
_OS = "OS integrations are out of this daemon's scope"

_EXACT = {
    "infer": _INFERENCE,
    "infer_stream": _INFERENCE,
    "embed": _INFERENCE,
    "generate": _INFERENCE,
    "rerank": _INFERENCE,
    "tokenize": _INFERENCE,
    "transcribe": _INFERENCE,
    "synthesize": _INFERENCE,
    "classify": _INFERENCE,
    "search": "web search is out of this daemon's scope",
    "web_fetch": "web fetching is out of this daemon's scope",
    "goal.suggest": "suggesting a goal needs model inference, which is out of this daemon's scope",
    "memory.admission_table": "the memory admission table is not implemented by this daemon",
    "memory.set_admission_table": "the memory admission table is not implemented by this daemon",
    "voice.prepare_parakeet": "downloading speech models is out of this daemon's scope (it recognizes offline with pocketsphinx)",
    "voice.prepare_diarizer": "speaker diarization is not implemented by this daemon",
    "voice.enroll_speaker": "speaker enrollment is not implemented by this daemon",
    "voice.list_enrollments": "speaker enrollment is not implemented by this daemon",
    "voice.remove_enrollment": "speaker enrollment is not implemented by this daemon",
    "voice.dispatch_turn": _INFERENCE,
    "voice.cancel_turn": _INFERENCE,
    "voice.prewarm_turn": _INFERENCE,
}

_PREFIXES = (
    ("infer.", _INFERENCE),
    ("inference.", _INFERENCE),
    ("models.", _INFERENCE),
    ("speech.", _INFERENCE),
    ("vision.", _INFERENCE),
    ("video.", _INFERENCE),
    ("nlp.", _INFERENCE),
    ("coder.", "the coder is out of this daemon's scope"),
    ("browser.", "browser automation is out of this daemon's scope"),
    ("automation.", _OS),
    ("mail.", _OS),
    ("calendar.", _OS),
    ("messages.", _OS),
    ("contacts.", _OS),
    ("notes.", _OS),
    ("reminders.", _OS),
    ("photos.", _OS),
    ("bookmarks.", _OS),
    ("files.", _OS),
    ("keychain.", _OS),
    ("health.", _OS),
    ("secret.", _OS),
    ("accounts.", _OS),
    ("auth.", "Parslee account sign-in is out of this daemon's scope"),
    ("parslee.", "Parslee account services are out of this daemon's scope"),
    ("openrouter.", "account connections are out of this daemon's scope"),
    ("openai_codex.", "account connections are out of this daemon's scope"),
    ("mcp.", "the MCP endpoint is out of this daemon's scope"),
)

def out_of_scope_reason(method: str) -> str | None:
    reason = _EXACT.get(method)
    if reason is not None:
        return reason
    for prefix, why in _PREFIXES:
        if method.startswith(prefix):
            return why
    return None
