"""
The dashboard's acceptance in headless Chromium, against one ``twist car``
process: log in with the logged code; watch a supervised agent killed and
restarted; follow a run's turns live; approve one parked call and deny
another; chat with an attached agent; act on an A2UI surface; the request
chart; log out.  The tests run in file order on one logged-in page.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
import urllib.request
from typing import Any

import pytest

from dashboard_harness import Browser, Daemon, RpcError, agent_spec, new_home, require_chromium, write_manifest

pytestmark = pytest.mark.browser

SLEEPER = "import time; time.sleep(600)"


class World:
    def __init__(self, daemon: Daemon, browser: Browser, agents: dict[str, dict[str, Any]]) -> None:
        self.daemon = daemon
        self.browser = browser
        self.agents = agents
        self.clients: list[Any] = []

    def client(self, **auth: Any) -> Any:
        client = self.daemon.client(**auth)
        self.clients.append(client)
        return client

    def agent_client(self, agent_id: str) -> Any:
        return self.client(agent=(agent_id, self.agents[agent_id]["token"]))

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients = []


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_chromium()
    base = tmp_path_factory.mktemp("dashboard")
    home = new_home(base)
    agents = {
        "worker": agent_spec("worker", "attach_agent.py", auto_start=True, restart="on_failure", backoff_secs=3.0),
        "chatter": agent_spec("chatter", "chat_agent.py", auto_start=True),
        # Never started: the tests speak for it (it records runs and publishes a surface).
        "recorder": agent_spec("recorder", None, "-c", "pass"),
        "gate-a": agent_spec("gate-a", None, "-c", SLEEPER, restart="never"),
        "gate-b": agent_spec("gate-b", None, "-c", SLEEPER, restart="never"),
    }
    write_manifest(home, list(agents.values()))
    daemon = Daemon(home)
    browser = None
    try:
        browser = Browser(base / "profile")
        state = World(daemon, browser, agents)
        yield state
        state.close_clients()
    finally:
        if browser is not None:
            browser.quit()
        daemon.stop()


@pytest.fixture
def page(world):
    yield world
    world.close_clients()
    # The tests load a spent login URL and a logged-out /api/session on purpose
    # (plain-text and JSON answers, for which the browser also asks for a favicon).
    expected = ("/login?code=", "/favicon.ico", "/api/session - Failed to load resource: the server responded with a status of 401")
    errors = [e for e in world.browser.console_errors() if not any(x in e for x in expected)]
    assert not errors, errors


def iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def health(daemon: Daemon) -> dict[str, Any]:
    request = urllib.request.Request(f"{daemon.origin}/health")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


# -- a. log in --------------------------------------------------------------------------------


def test_a_log_in_with_the_logged_url(page):
    b, daemon = page.browser, page.daemon
    b.get(daemon.login_url)
    b.wait(lambda: b.js("return document.body.dataset.ready === '1';"), 20, "the page to connect")
    assert b.driver.current_url == f"{daemon.origin}/#agents"
    assert b.text("#conn-status") == "connected"
    assert b.text("#daemon-version").startswith("car-twisted ")
    # The session cookie is HttpOnly: the page's script never sees it.
    assert "car_dashboard" not in b.js("return document.cookie;")
    assert [c["name"] for c in b.driver.get_cookies()] == ["car_dashboard"]
    # The code is spent: the same URL again is refused, and the page still works.
    b.get(daemon.login_url)
    assert "wrong or has been used" in b.js("return document.body.textContent;")
    b.get(f"{daemon.origin}/")
    b.wait(lambda: b.js("return document.body.dataset.ready === '1';"), 20, "the page to reconnect")
    assert daemon.next_login_url() != daemon.login_url


# -- b. supervised agents ----------------------------------------------------------------------


def test_b_a_killed_agent_shows_backoff_then_its_restart(page):
    b = page.browser
    b.tab("agents")
    row = '#agents-table tr[data-agent-id="worker"]'

    def cell(name: str) -> str | None:
        return b.text(f'{row} [data-testid="agent-{name}"]')

    b.wait(lambda: cell("status") == "running" and cell("attached") == "yes", 20, "the worker running and attached")
    pid = int(cell("pid"))
    listed = next(a for a in page.client().call("agents.list", {}) if a["id"] == "worker")
    assert listed["pid"] == pid
    b.wait(lambda: f"starting, pid {pid}" in (cell("log") or ""), 10, "the worker's log tail")
    assert set(b.js("return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent);",
                    f"{row} button[data-action]")) == {"Start", "Stop", "Restart"}
    b.screenshot("agents")

    os.kill(pid, signal.SIGKILL)
    b.wait(lambda: cell("status") == "backoff", 10, "the backoff after kill -9")
    assert cell("exit") == "-9" and cell("pid") == "–"
    b.wait(lambda: cell("status") == "running" and cell("attached") == "yes" and cell("pid") not in ("–", str(pid)),
           20, "the restart")
    assert cell("restarts") == "1"

    # The page's own buttons: stop (SIGTERM), then start again.
    b.click(f'{row} button[data-action="stop"]')
    b.wait(lambda: cell("status") == "stopped", 15, "the stop")
    assert cell("exit") == "-15"
    b.click(f'{row} button[data-action="start"]')
    b.wait(lambda: cell("status") == "running" and cell("attached") == "yes", 20, "the start")


# -- c. a run, live ----------------------------------------------------------------------------


def test_c_a_run_s_turns_arrive_live(page):
    b = page.browser
    recorder = page.agent_client("recorder")
    run_id = recorder.call("runs.start", {"intent": "summarise the quarterly report"})["run_id"]
    t0 = time.time()

    def turn(i: int) -> dict[str, Any]:
        return {
            "prompt": f"step {i}: <b>not markup</b>",
            "output": f"answer {i} " + "words " * (5 * i),
            "tool": "llm" if i % 2 == 0 else "search",
            "status": "error" if i == 3 else "ok",
            "started_at": iso(t0 + 0.6 * i),
            "duration_ms": 400 + 150 * i,
        }

    recorder.call("runs.record_turns", {"run_id": run_id, "turns": [turn(0), turn(1)]})
    b.tab("runs")
    b.click("#runs-refresh")
    row = f'#runs-table tr[data-run-id="{run_id}"]'
    b.wait(lambda: b.count(row) == 1, 10, "the run in the list")
    assert b.text(f'{row} [data-testid="run-status"]') == "in_progress"
    b.click(row)
    b.wait(lambda: b.count('#trace-turns [data-testid="turn"]') == 2, 10, "the snapshot's turns")
    assert b.text("#trace-status") == "in_progress"
    assert b.js("return !document.getElementById('trace-live').hidden;")
    for i in range(2, 7):
        recorder.call("runs.record_turns", {"run_id": run_id, "turns": [turn(i)]})
        b.wait(lambda: b.count('#trace-turns [data-testid="turn"]') == i + 1, 10, f"turn {i} to arrive")
        assert b.text(f'#trace-turns [data-turn-index="{i}"] .turn-prompt') == f"step {i}: <b>not markup</b>"
        assert b.count('#trace-timeline rect[data-testid="timeline-bar"]') == i + 1
    # The run's row in the list follows the trace.
    b.wait(lambda: b.text(f'{row} [data-testid="run-turns"]') == "7", 5, "the row's turn count")
    # Turn text is text, never markup.
    assert b.count("#trace-turns b") == 0
    # The timeline is a picture on a time axis: bars left to right in start order, an error bar marked.
    bars = b.js("""return Array.from(document.querySelectorAll('#trace-timeline rect.bar'),
        r => [Number(r.dataset.turnIndex), parseFloat(r.getAttribute('x')), parseFloat(r.getAttribute('width')), r.classList.contains('bad')]);""")
    assert [index for index, *_ in bars] == list(range(7))
    xs = [x for _, x, _, _ in bars]
    assert xs == sorted(xs) and xs[0] < xs[-1]
    assert [index for index, _, _, bad in bars if bad] == [3]
    b.screenshot("runs")

    recorder.call("runs.complete", {"run_id": run_id, "outcome": {"summary": "done"}})
    b.wait(lambda: b.text("#trace-status") == "completed", 10, "the run's end")
    assert b.js("return document.getElementById('trace-live').hidden;")
    b.click('#trace-timeline rect[data-turn-index="3"]')
    b.wait(lambda: b.count('#trace-turns .turn.selected[data-turn-index="3"]') == 1, 5, "the picked turn")


# -- d. approvals ------------------------------------------------------------------------------


def test_d_approve_one_parked_call_and_deny_another(page):
    b = page.browser
    host = page.client()
    for agent_id in ("gate-a", "gate-b"):
        # Run it once as it is, then change its launch spec: the next start waits for approval.
        host.call("agents.start", {"id": agent_id})
        host.call("agents.wait", {"id": agent_id, "targets": ["running"], "timeout_secs": 10})
        host.call("agents.stop", {"id": agent_id})
        spec = {k: v for k, v in page.agents[agent_id].items() if k != "token"}
        spec["args"] = ["-c", SLEEPER.replace("600", "601")]
        host.call("agents.upsert", spec)
    caller = page.client(role="daemon")
    parked = {agent_id: caller.send("agents.start", {"id": agent_id}) for agent_id in ("gate-a", "gate-b")}
    b.tab("approvals")
    b.wait(lambda: b.count('#approvals-pending [data-testid="approval"]') == 2, 10, "two pending approvals")
    assert b.text("#approvals-count") == "2"
    approvals = {
        json.loads(a["context"]["params_preview"])["id"]: a["id"]
        for a in host.call("host.approvals", {})["approvals"]
        if a["status"] == "pending"
    }
    assert set(approvals) == {"gate-a", "gate-b"}
    assert not any(caller.answered(rid) for rid in parked.values()), "the callers wait"
    card = '#approvals-pending [data-approval-id="{}"]'
    assert "Allow agents.start?" in b.text(card.format(approvals["gate-a"]))
    b.screenshot("approvals")

    b.click(card.format(approvals["gate-a"]) + ' [data-testid="approve"]')
    started = caller.result(parked["gate-a"])
    assert started["id"] == "gate-a" and started["status"] in ("starting", "running")
    b.click(card.format(approvals["gate-b"]) + ' [data-testid="deny"]')
    with pytest.raises(RpcError) as refused:
        caller.result(parked["gate-b"])
    assert refused.value.code == -32003
    b.wait(lambda: b.count('#approvals-pending [data-testid="approval"]') == 0, 5, "no pending approval")
    assert b.text("#approvals-count") == "0"
    outcomes = b.js("""return Object.fromEntries(Array.from(document.querySelectorAll('#approvals-resolved tr[data-approval-id]'),
        r => [r.dataset.approvalId, r.querySelector('[data-testid=approval-outcome]').textContent]));""")
    assert outcomes[approvals["gate-a"]] == "approved" and outcomes[approvals["gate-b"]] == "denied"
    host.call("agents.stop", {"id": "gate-a"})


# -- e. chat -----------------------------------------------------------------------------------


def last_reply(b: Browser) -> dict[str, Any]:
    return b.js("""const all = document.querySelectorAll('#chat-log [data-testid=chat-reply]');
        const r = all[all.length - 1];
        return r ? {text: r.querySelector('[data-testid=chat-reply-text]').textContent, done: r.dataset.done === '1',
                    extras: r.querySelector('.reply-extras').textContent} : null;""")


def send_chat(b: Browser, prompt: str) -> None:
    from selenium.webdriver.common.by import By

    box = b.driver.find_element(By.ID, "chat-prompt")
    box.clear()
    box.send_keys(prompt)
    b.click("#chat-send")


def test_e_chat_streams_the_attached_agent_s_reply(page):
    from selenium.webdriver.support.ui import Select

    b = page.browser
    b.tab("chat")
    options = "return Array.from(document.querySelectorAll('#chat-agent option'), o => o.value);"
    b.wait(lambda: "chatter" in b.js(options), 15, "the attached chat agent")
    assert "recorder" not in b.js(options)
    Select(b.driver.find_element("id", "chat-agent")).select_by_value("chatter")

    # Tokens stream in while the agent is still talking (one every 50 ms until cancelled).
    send_chat(b, "linger")
    first = b.wait(lambda: (r := last_reply(b)) and len(r["text"]) >= 6 and r, 10, "the first tokens")
    assert not first["done"] and first["text"].startswith("t0t1")
    b.wait(lambda: len(last_reply(b)["text"]) > len(first["text"]) + 4, 10, "more tokens")
    b.click("#chat-cancel")
    b.wait(lambda: last_reply(b)["done"], 5, "the cancel")
    assert "cancelled" in last_reply(b)["extras"]

    send_chat(b, "echo streamed tokens arrive in order")
    b.wait(lambda: last_reply(b)["done"], 10, "the echo")
    assert last_reply(b)["text"] == "streamedtokensarriveinorder"

    # An approval the agent raises mid-chat, answered from the page.
    send_chat(b, "approve go ahead")
    b.wait(lambda: b.count('#chat-log .chat-approval button') == 2, 10, "the agent's approval request")
    b.js("document.querySelector('#chat-log .chat-approval button').click();")
    b.wait(lambda: last_reply(b)["done"], 10, "the chat to finish")
    assert last_reply(b)["text"] == 'goaheaddecision={"approved": true}'
    b.screenshot("chat")


# -- f. A2UI surfaces ---------------------------------------------------------------------------


SURFACE = [
    {"version": "v0.9", "createSurface": {"surfaceId": "deploy-1",
                                          "catalogId": "https://a2ui.org/specification/v0_9/basic_catalog.json"}},
    {"version": "v0.9", "updateComponents": {"surfaceId": "deploy-1", "components": [
        {"id": "root", "component": "Column", "children": ["title", "card", "envs", "rule", "form"]},
        {"id": "title", "component": "Text", "text": "Deploy release v1.2?", "variant": "h2"},
        {"id": "card", "component": "Card", "child": "card-row"},
        {"id": "card-row", "component": "Row", "children": ["state", "note"]},
        {"id": "state", "component": "Badge", "text": {"path": "/state"}, "variant": "warning"},
        {"id": "note", "component": "Text", "text": "<img src=x onerror=alert(1)> stays text"},
        {"id": "envs", "component": "List", "children": {"componentId": "env-item", "path": "/targets"}},
        {"id": "env-item", "component": "Text", "text": {"path": "name"}},
        {"id": "rule", "component": "Divider"},
        {"id": "form", "component": "Row", "children": ["env", "confirm", "go"]},
        {"id": "env", "component": "TextField", "label": "Environment", "value": {"path": "/env"}},
        {"id": "confirm", "component": "CheckBox", "label": "I checked the changelog", "value": {"path": "/confirmed"}},
        {"id": "go", "component": "Button", "child": "go-label", "variant": "primary", "action": {"event": {
            "name": "deploy",
            "context": {"env": {"path": "/env"}, "confirmed": {"path": "/confirmed"}, "release": "v1.2"}}}},
        {"id": "go-label", "component": "Text", "text": "Deploy"},
    ]}},
    {"version": "v0.9", "updateDataModel": {"surfaceId": "deploy-1", "value": {
        "env": "staging", "confirmed": False, "state": "waiting",
        "targets": [{"name": "eu-west"}, {"name": "us-east"}, {"name": "ap-south"}]}}},
]


def test_f_a_surface_button_sends_a2ui_action_to_a_subscriber(page):
    from selenium.webdriver.common.by import By

    b = page.browser
    subscriber = page.client(role="daemon")
    assert subscriber.call("a2ui/subscribe", {}) == {"subscribed": True}
    publisher = page.agent_client("recorder")
    for message in SURFACE:
        publisher.call("a2ui.apply", message)
    b.tab("surfaces")
    card = '#surfaces-list [data-surface-id="deploy-1"]'
    b.wait(lambda: b.count(card) == 1, 10, "the surface")
    b.wait(lambda: b.text(f'{card} [data-component-id="state"]') == "waiting", 5, "the data model")
    assert b.text(f'{card} h2[data-component-id="title"]') == "Deploy release v1.2?"
    assert b.js("return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent);",
                f'{card} [data-component-id="env-item"]') == ["eu-west", "us-east", "ap-south"]
    assert b.text(f'{card} [data-component-id="note"]') == "<img src=x onerror=alert(1)> stays text"
    assert b.count(f"{card} img") == 0
    for kind in ("Column", "Row", "Card", "Text", "Badge", "List", "Divider", "TextField", "CheckBox", "Button"):
        assert b.count(f'{card} [data-component="{kind}"]') >= 1, kind

    field = b.driver.find_element(By.CSS_SELECTOR, f'{card} [data-component-id="env"] input')
    assert field.get_attribute("value") == "staging"
    field.clear()
    field.send_keys("production")
    b.click(f'{card} [data-component-id="confirm"] input')
    b.click(f'{card} button[data-component-id="go"]')
    event = subscriber.notification(lambda m: m["method"] == "a2ui.event" and m["params"]["kind"] == "a2ui.action")
    action = event["params"]["result"]["action"]
    assert (action["name"], action["surfaceId"], action["sourceComponentId"]) == ("deploy", "deploy-1", "go")
    assert action["context"] == {"env": "production", "confirmed": True, "release": "v1.2"}
    b.wait(lambda: b.text(f'{card} [data-testid="surface-status"]') == "sent deploy", 10, "the action's answer")
    b.screenshot("surfaces")

    # The agent's next update reaches the page live.
    publisher.call("a2ui.apply", {"version": "v0.9", "updateDataModel": {
        "surfaceId": "deploy-1", "path": "/state", "value": "deploying"}})
    b.wait(lambda: b.text(f'{card} [data-component-id="state"]') == "deploying", 10, "the live update")
    publisher.call("a2ui.apply", {"version": "v0.9", "deleteSurface": {"surfaceId": "deploy-1"}})
    b.wait(lambda: b.count(card) == 0, 10, "the deleted surface to go")


def test_the_rest_of_the_catalog_renders(page):
    """Every advertised component draws something (media only named: the page loads nothing from elsewhere)."""
    b = page.browser
    publisher = page.agent_client("recorder")
    components = [
        {"id": "root", "component": "Column", "children": [
            "tabs", "pick", "select", "slider", "when", "pic", "icon", "video", "audio", "chart", "file", "picker",
            "gap", "modal"]},
        {"id": "tabs", "component": "Tabs", "tabs": [{"title": "One", "child": "one"}, {"title": "Two", "child": "two"}]},
        {"id": "one", "component": "Text", "text": "first tab"},
        {"id": "two", "component": "Text", "text": "second tab"},
        {"id": "pick", "component": "ChoicePicker", "label": "Regions", "variant": "multipleSelection",
         "options": [{"label": "EU", "value": "eu"}, {"label": "US", "value": "us"}], "value": {"path": "/regions"}},
        {"id": "select", "component": "Select", "label": "Size", "options": ["s", "m", "l"], "value": {"path": "/size"}},
        {"id": "slider", "component": "Slider", "label": "Replicas", "min": 1, "max": 9, "value": {"path": "/replicas"}},
        {"id": "when", "component": "DateTimeInput", "label": "When", "enableDate": True, "value": {"path": "/day"}},
        {"id": "pic", "component": "Image", "url": "https://example.invalid/cat.png", "altText": "a cat"},
        {"id": "icon", "component": "Icon", "name": "rocket"},
        {"id": "video", "component": "Video", "url": "https://example.invalid/v.mp4"},
        {"id": "audio", "component": "AudioPlayer", "url": "https://example.invalid/a.mp3", "description": "briefing"},
        {"id": "chart", "component": "Chart", "title": "Load", "data": [3, 5, 2, 8]},
        {"id": "file", "component": "File", "name": "report.pdf"},
        {"id": "picker", "component": "FilePicker", "label": "Attach"},
        {"id": "gap", "component": "Spacer"},
        {"id": "modal", "component": "Modal", "trigger": "open", "content": "inside"},
        {"id": "open", "component": "Button", "child": "open-label", "action": {"event": {"name": "noop"}}},
        {"id": "open-label", "component": "Text", "text": "Details"},
        {"id": "inside", "component": "Text", "text": "modal content"},
    ]
    for message in (
        {"version": "v0.9", "createSurface": {"surfaceId": "catalog"}},
        {"version": "v0.9", "updateComponents": {"surfaceId": "catalog", "components": components}},
        {"version": "v0.9", "updateDataModel": {"surfaceId": "catalog", "value": {
            "regions": ["us"], "size": "m", "replicas": 3, "day": "2026-12-24"}}},
    ):
        publisher.call("a2ui.apply", message)
    b.tab("surfaces")
    card = '#surfaces-list [data-surface-id="catalog"]'
    b.wait(lambda: b.count(card) == 1, 10, "the catalog surface")
    drawn = set(b.js("return Array.from(document.querySelectorAll(arguments[0]), e => e.dataset.component);",
                     f"{card} [data-component]"))
    assert drawn >= {c["component"] for c in components}
    assert b.count(f"{card} .a2-missing, {card} .a2-unsupported") == 0
    assert b.count(f"{card} img") == 0  # not a data: image: named, not loaded
    assert "a cat" in b.text(f'{card} [data-component-id="pic"]')
    assert b.js("return document.querySelector(arguments[0]).value;", f'{card} [data-component-id="slider"] input') == "3"
    assert b.js("return Array.from(document.querySelector(arguments[0]).selectedOptions, o => o.value);",
                f'{card} [data-component-id="pick"] select') == ["us"]
    assert b.count(f'{card} [data-component-id="chart"] rect') == 4
    assert b.text(f'{card} [data-component-id="tabs"] .a2-tab-panel') == "first tab"
    b.click(f'{card} [data-component-id="tabs"] .a2-tab:nth-child(2)')
    b.wait(lambda: b.text(f'{card} [data-component-id="tabs"] .a2-tab-panel') == "second tab", 5, "the second tab")
    b.click(f'{card} [data-component-id="modal"] .a2-modal-trigger button')
    b.wait(lambda: b.js("return document.querySelector(arguments[0]).open;", f'{card} [data-component-id="modal"] dialog'),
           5, "the modal")
    b.click(f'{card} [data-component-id="modal"] .a2-dialog-close')
    publisher.call("a2ui.apply", {"version": "v0.9", "deleteSurface": {"surfaceId": "catalog"}})
    b.wait(lambda: b.count(card) == 0, 10, "the surface to go")


# -- events, the chart, logout ------------------------------------------------------------------------


def test_events_view_shows_the_host_stream(page):
    b = page.browser
    host = page.client()
    host.call("host.notify", {"kind": "dashboard.test", "message": "hello from the test <script>"})
    b.tab("events")
    b.wait(lambda: b.text('#events-table tbody tr:first-child [data-testid="event-kind"]') == "dashboard.test",
           10, "the newest event on top")
    assert b.text('#events-table tbody tr:first-child [data-testid="event-message"]') == "hello from the test <script>"
    kinds = b.js("return Array.from(document.querySelectorAll('#events-table [data-testid=event-kind]'), e => e.textContent);")
    assert {"approval.requested", "approval.resolved", "a2ui.action", "a2ui.surface_updated"} <= set(kinds)
    b.screenshot("events")
    b.driver.find_element("id", "events-filter").send_keys("approval.res")
    b.wait(lambda: set(b.js("return Array.from(document.querySelectorAll('#events-table [data-testid=event-kind]'), e => e.textContent);"))
           == {"approval.resolved"}, 5, "the filter")
    b.driver.find_element("id", "events-filter").clear()
    b.js("document.getElementById('events-filter').dispatchEvent(new Event('input'));")


def test_metrics_chart_plots_the_request_rate(page):
    b = page.browser
    b.tab("metrics")
    b.wait(lambda: (b.text('#chart-rate [data-testid="chart-value"]') or "").endswith("req/s"), 10, "a request rate")
    b.wait(lambda: len(b.js("return document.querySelector('#chart-rate path.line').getAttribute('d');") or "") > 10,
           10, "a line")
    assert (b.text('#chart-latency [data-testid="chart-value"]') or "").endswith("ms")
    b.screenshot("metrics")


def test_logout_closes_the_session_and_its_socket(page):
    b, daemon = page.browser, page.daemon
    b.tab("agents")
    before = health(daemon)["sessions"]
    b.click("#logout")
    b.wait(lambda: b.js("return document.body.dataset.loggedOut === '1';"), 10, "the logged-out page")
    assert b.text("#logged-out-title") == "Logged out"
    b.wait(lambda: health(daemon)["sessions"] == before - 1, 10, "the page's socket to close")
    b.screenshot("logged-out")
    b.get(f"{daemon.origin}/api/session")
    assert "log in first" in b.js("return document.body.textContent;")
    # A fresh code logs in again.
    b.get(daemon.next_login_url())
    b.wait(lambda: b.js("return document.body.dataset.ready === '1';"), 20, "a new session")
