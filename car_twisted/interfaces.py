"""
The pluggable parts of the daemon, as zope interfaces.

Every component an embedder may replace is declared here; implementations
say ``@implementer(...)`` and are found through each ``ServerState``'s own
adapter registry (see ``car_twisted.adapters``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from car_twisted.json_value import JsonValue
    from car_twisted.memory.model import Fact
    from car_twisted.proposal.ir import ToolCall
    from car_twisted.rpc.registry import MethodSpec
    from car_twisted.runs.model import RunRecord, StoredRun
    from car_twisted.session import ClientSession
    from car_twisted.voice.model import Segment, TranscriptUpdate, VoiceEvent

__all__ = [
    "IAgentIdentities",
    "IBinaryReceiver",
    "IClientSession",
    "IMemgine",
    "IMemoryScope",
    "IJournaledMemgine",
    "IMemgineIngestSink",
    "IRecognition",
    "ISpeaker",
    "ITranscriber",
    "IVoiceEventSink",
    "IMethodProvider",
    "IRunStore",
    "ISessionFeature",
    "IToolExecutor",
    "IWsSink",
]


class IWsSink(Interface):
    """
    The write half of one WebSocket connection, whatever carries it.

    The Autobahn protocol provides it for TCP and UNIX sockets alike; tests
    use an in-memory fake.  Every method is safe to call after the peer has
    gone: it reports ``False`` (or does nothing) rather than raising.
    """

    writable = Attribute("True while frames can still be written.")

    def send_text(payload: bytes) -> bool:
        """
        Write one text frame.

        @param payload: UTF-8 encoded JSON.
        @type payload: L{bytes}
        @return: C{True} if written, C{False} if the connection is gone.
        """

    def send_binary(payload: bytes) -> bool:
        """
        Write one binary frame.

        @type payload: L{bytes}
        @return: C{True} if written, C{False} if the connection is gone.
        """

    def close(code: int, reason: str) -> None:
        """
        Start a WebSocket close with C{code} and C{reason}, then drop the
        connection without waiting for the peer's Close (the real client
        never answers one).
        """


class IClientSession(Interface):
    """
    Marker for the per-connection session; components hang off it by
    adaptation (C{state.component(session, IWsSink)}).
    """

    client_id = Attribute("A daemon-unique id for this connection.")
    channel = Attribute("The session's WsChannel.")


class ISessionFeature(Interface):
    """
    One feature's per-connection state (``ClientSession.feature``): made on
    first use, closed with the connection.
    """

    def holds_client_state() -> bool:
        """
        @return: C{True} while it holds something the client registered
            that a reconnect would lose (the client replays nothing), which
            keeps the connection from being closed as idle.
        """

    def close() -> None:
        """The connection is gone: release what this feature holds."""


class IBinaryReceiver(Interface):
    """
    Where a connection's binary frames go (the CAR binary frame protocol of
    voice streams).  Found by adapting the session through the daemon's
    registry; with none, binary frames are refused with an error.
    """

    def receive(payload: bytes) -> None:
        """
        Take one binary message from the client.

        @type payload: L{bytes}
        """


class IMethodProvider(Interface):
    """
    A source of JSON-RPC methods: one per namespace module, plus whatever
    an embedder adds.
    """

    def methods() -> Iterable[MethodSpec]:
        """
        @return: an iterable of L{car_twisted.rpc.registry.MethodSpec}.
        """


class IAgentIdentities(Interface):
    """
    Per-agent credentials for C{session.auth {agent_id, token}}.

    The daemon's agent supervisor provides this unless the embedder gives
    its own (``ServerStateConfig.agent_identities``).
    """

    def verify(agent_id: str, token: str) -> bool:
        """
        @return: C{True} when C{token} is C{agent_id}'s own token.  Must
            compare in constant time and must not reveal whether the agent
            exists.
        """

    def attach(agent_id: str, session: ClientSession) -> None:
        """
        Bind C{session} to C{agent_id}.

        @raise car_twisted.errors.AgentAlreadyAttached: another live
            connection holds the binding.
        """

    def detach(agent_id: str, session: ClientSession) -> None:
        """
        Release the binding if C{session} holds it; otherwise do nothing.
        """


class IToolExecutor(Interface):
    """
    Runs one tool call on behalf of the proposal engine.

    The daemon owns no tools: its default (``WsToolExecutor``) calls the
    client back with ``tools.execute``.  Embedders may install their own
    (an in-process executor, say) through the state's adapters.
    """

    supports_detached = Attribute(
        "True if streaming / long-running invocations can be started."
    )

    def execute(call: ToolCall) -> Deferred[JsonValue]:
        """
        Run C{call} (a L{car_twisted.proposal.ir.ToolCall}).

        @return: a Deferred firing with the tool's output, or failing with
            L{car_twisted.proposal.ir.ToolError}.  Cancelling it abandons the
            call (the executor tells the tool, if it can).
        """


class IRunStore(Interface):
    """
    Durable storage of run records.  Every method returns a Deferred;
    appends to one run complete in the order they were made, and an append
    fires only once its records are written (acknowledged means stored).
    Operations on one run (appends, summary writes, reads, deletes) happen
    in the order they were made.  The store stores; what to keep is the
    registry's policy (``car_twisted.runs.retention``).
    """

    def append(agent_id: str, run_id: str, records: list[RunRecord]) -> Deferred[int | None]:
        """
        Append C{records} (dicts) to the run's log.

        @return: a Deferred firing with the number of bytes the append added
            to the store (None if the store does not count).
        """

    def write_summary(summary: RunRecord) -> Deferred[int | None]:
        """
        Replace the run's summary (status, counts, times).

        @return: a Deferred firing with the summary's size in bytes (None if
            the store does not count).
        """

    def read(agent_id: str, run_id: str) -> Deferred[list[RunRecord] | None]:
        """
        The run's records in order (a torn last line is ignored), or None
        if there is no such run.
        """

    def find(run_id: str) -> Deferred[str | None]:
        """The owning agent id of C{run_id}, or None."""

    def summaries(agent_id: str) -> Deferred[list[RunRecord]]:
        """Every stored run summary of C{agent_id}."""

    def inventory() -> Deferred[list[StoredRun]]:
        """
        Every run the store holds, read once (off the reactor thread) by the
        registry when it first needs its retention index.

        @return: a Deferred firing with a list of
            L{car_twisted.runs.model.StoredRun}: agent, run, bytes held,
            start time (or last write) and whether its summary says ended.
        """

    def delete(agent_id: str, run_id: str) -> Deferred[None]:
        """
        Remove the run (its log and summary) after every operation on it
        made before; a run that is not there is no error.

        @return: a Deferred firing with None once it is gone.
        """


class IMemoryScope(Interface):
    """
    Which memory graph a connection uses (``car_twisted.memory.scopes``):
    adapt one to ``IMemgine`` in a daemon's registry to give some scopes an
    engine of their own.
    """

    kind = Attribute("``shared``, ``namespace`` or ``agent``.")
    name = Attribute("The namespace or agent id; empty for the shared graph.")


class IMemgine(Interface):
    """
    One memory graph ("memgine"): facts linked through the entities and
    terms they share, retrieved by personalized PageRank from a query's
    terms.  Everything runs on the reactor thread and is bounded: adding a
    fact costs O(its terms), never a rebuild; a query has a fixed iteration
    budget whatever the graph's size.
    """

    fact_limit = Attribute("The most valid facts this graph holds.")
    generation = Attribute("A counter that changes with every change (persistence watches it).")

    def add(
        subject: str,
        body: str,
        kind: str = "pattern",
        fact_id: str | None = None,
        confidence: float = 1.0,
        tags: Iterable[str] = (),
        source: str = "",
        constraint: bool | None = None,
        metadata: Mapping[str, JsonValue] | None = None,
    ) -> Fact:
        """
        Add a fact, or replace the one with the same C{fact_id}.

        @return: the stored L{car_twisted.memory.model.Fact}.
        @raise car_twisted.memory.model.MemoryFull: past C{fact_limit}.
        """

    def get(fact_id: str) -> Fact | None:
        """The fact with C{fact_id}, or None."""

    def delete(fact_id: str) -> Fact | None:
        """Remove a fact; @return: it, or None if there was none."""

    def count() -> int:
        """How many valid facts the graph holds."""

    def facts() -> list[Fact]:
        """Every valid fact, oldest first."""

    def query(text: str, k: int) -> list[Fact]:
        """
        The C{k} facts most relevant to C{text}, best first; equal scores
        keep insertion order.  With a utility weight above 0 the score
        blends each fact's utility posterior.
        """

    def build_context(query: str, budget_tokens: int) -> str:
        """
        The context string for a model: Identity, Constraints, Facts,
        Conversation, Environment, Known Unknowns, within C{budget_tokens}.
        """

    def consolidate() -> dict[str, JsonValue]:
        """Merge duplicates and expire superseded facts; @return: a report of what changed."""

    def snapshot() -> dict[str, JsonValue]:
        """The whole graph as a JSON-ready object (what ``restore`` takes)."""

    def restore(snapshot: object) -> int:
        """
        Replace the whole graph with C{snapshot}.

        @return: how many facts it now holds.
        @raise ValueError: the snapshot is not one; the graph is untouched.
        """

    def utility() -> tuple[float, float]:
        """@return: C{(utility_weight, utility_exploration)}."""

    def set_utility(weight: float | None = None, exploration: float | None = None) -> tuple[float, float]:
        """Set either (None keeps it), clamped; @return: the applied pair."""

    def mark_used(fact_id: str) -> Fact | None:
        """A fact was shown to a model (a use, for outcome credit); @return: it, or None."""

    def record_outcome(fact_id: str, success: bool) -> Fact | None:
        """Credit (or debit) a fact's utility posterior; @return: the fact, or None."""



class IJournaledMemgine(IMemgine):
    """
    A memory graph that says what changed, so persistence appends a
    journal instead of rewriting the whole graph after every change.
    """

    def drain_changes() -> list[dict[str, JsonValue]]:
        """The changes since the last drain, as journal entries (O(changes))."""

    def mark_saved() -> None:
        """Forget the changes so far: they are on disk."""

    def replay(entries: Iterable[object]) -> int:
        """Apply journal entries in order; @return: how many were malformed and skipped."""

    def snapshot_chunks(size: int = 2048) -> tuple[dict[str, JsonValue], Iterator[list[JsonValue]]]:
        """A snapshot's header and its fact records, built lazily chunk by chunk."""


class IVoiceEventSink(Interface):
    """
    Where a voice stream's events go, in order: to one client as
    ``voice.event`` notifications (and binary frames for speech where the
    stream asked), or through a wrapping sink first.  Found by adapting the
    session through the daemon's registry, so an embedder may bring its own.
    """

    def send(event: VoiceEvent) -> None:
        """Accept one event; never raises for a client that has gone."""


class IMemgineIngestSink(IVoiceEventSink):
    """
    A voice sink that writes final transcript segments into a memory graph
    (Conversation facts) and forwards every event, unchanged and in order,
    to the sink it wraps.  A multi-adapter of (``IVoiceEventSink``,
    ``IMemgine``) in the daemon's registry.
    """

    upstream = Attribute("The IVoiceEventSink every event is forwarded to.")
    graph = Attribute("The IMemgine final segments are written into.")
    on_ingest = Attribute(
        "Called with each Fact written (the daemon schedules the graph's write-back); a no-op by default."
    )


class IRecognition(Interface):
    """
    One stream's recognizer state.  Its methods block (they run the
    recognizer) and are only called from a worker thread, one call at a
    time per stream, never from the reactor thread.
    """

    def accept(pcm: bytes) -> TranscriptUpdate:
        """Feed 16-bit signed little-endian PCM at the declared rate and channels."""

    def finish() -> tuple[Segment, ...]:
        """End of audio: every segment not yet reported, oldest first."""

    def close() -> None:
        """Free the recognizer (after finish, or when the stream is dropped)."""


class ITranscriber(Interface):
    """A speech-to-text provider (``voice.providers.list`` kind ``stt``)."""

    name = Attribute("The provider id, e.g. ``pocketsphinx``.")
    description = Attribute("One line for ``voice.providers.list``.")

    def unavailable() -> str | None:
        """None when it can run here, else why not (e.g. the extra to install)."""

    def open(sample_rate: int, channels: int) -> IRecognition:
        """
        A recognizer for one stream (blocking: called from a worker thread).

        @raise car_twisted.voice.model.VoiceUnavailable: it cannot run here.
        @raise ValueError: a rate or channel count it cannot take.
        """


class ISpeaker(Interface):
    """A text-to-speech provider (``voice.providers.list`` kind ``tts``)."""

    name = Attribute("The provider id, e.g. ``espeak-ng``.")
    description = Attribute("One line for ``voice.providers.list``.")
    audio_format = Attribute("The format of its chunks: ``wav``, ``mp3`` or ``pcm``.")

    def unavailable() -> str | None:
        """None when it can run here, else why not."""

    def speak(text: str, voice: str | None, on_chunk: Callable[[bytes], None]) -> Deferred[None]:
        """
        Synthesize C{text}, calling C{on_chunk} on the reactor thread with
        each piece of audio as it is produced (their concatenation is one
        file of C{audio_format}).

        @return: a Deferred firing when synthesis is complete, failing if
            it failed; cancelling it stops the synthesis (its process is
            killed) and no chunk follows.
        """
