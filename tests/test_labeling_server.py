"""The labeling server: auth, isolation, input limits, parallel clients, and the page in headless Chromium."""

import json
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.labeling.commands import export_preferences  # noqa: E402
from rlhfkit.labeling.server import create_app, left_response  # noqa: E402
from rlhfkit.labeling.store import LabelStore  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
QUESTIONS = ["Why is the sky blue?", "What is the sun?", "How does ice form?", "What is a magnet?", "What is sound?"]
SCRIPT = "<script>document.title='pwned'</script>Hello"


@pytest.fixture()
def store_with_people(tmp_path):
    path = tmp_path / "labels.db"
    store = LabelStore(path, create=True)
    for index, question in enumerate(QUESTIONS):
        answer = SCRIPT if index == 0 else f"A kind answer {index}."
        store.add_candidates(({"role": "user", "content": question},), [("m1", answer), ("m2", f"Go away {index}.")])
    tokens = {name: store.add_annotator(name) for name in ("alice", "bob")}
    store.close()
    return path, tokens


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def submission(pair_id, choice, **extra):
    return {"pair_id": pair_id, "choice": choice, "submission_id": uuid.uuid4().hex, **extra}


def test_tokens_isolation_and_idempotent_submissions(store_with_people):
    path, tokens = store_with_people
    client = TestClient(create_app(path))
    assert client.get("/api/next").status_code == 401
    assert client.get("/api/next", headers=auth("wrong")).status_code == 401
    assert client.get("/api/judgements", headers={"Authorization": tokens["alice"]}).status_code == 401  # no "Bearer"
    pair = client.get("/api/next", headers=auth(tokens["alice"])).json()
    assert pair["pair_id"] == 1 and pair["progress"] == {"done": 0, "total": 5}
    assert SCRIPT in (pair["left"], pair["right"])  # returned as data; the page writes it with textContent
    body = submission(1, "left", comment="clear")
    first = client.post("/api/judgements", json=body, headers=auth(tokens["alice"]))
    again = client.post("/api/judgements", json=body, headers=auth(tokens["alice"]))
    assert first.json()["stored"] is True and again.json()["stored"] is False and again.json()["progress"]["done"] == 1
    (mine,) = client.get("/api/judgements", headers=auth(tokens["alice"])).json()
    alice_id = LabelStore(path).annotator_for_token(tokens["alice"])[0]
    assert (
        mine["choice"] == left_response(alice_id, 1)
        and mine["left"] == left_response(alice_id, 1)
        and mine["comment"] == "clear"
    )
    # Bob sees none of Alice's labels, and his judgement of the same pair leaves hers as it was.
    assert client.get("/api/judgements", headers=auth(tokens["bob"])).json() == []
    assert (
        client.get("/api/next", headers=auth(tokens["bob"])).json()["pair_id"] == 2
    )  # pairs short of judgements first
    client.post("/api/judgements", json=submission(1, "tie"), headers=auth(tokens["bob"]))
    assert client.get("/api/judgements", headers=auth(tokens["alice"])).json() == [mine]
    assert client.get("/api/next", headers=auth(tokens["alice"])).json()["pair_id"] == 2


@pytest.mark.parametrize(
    "request_kwargs, status",
    [
        ({"json": submission(99, "left")}, 404),
        ({"json": submission(1, "A")}, 422),
        ({"json": {"pair_id": 1, "choice": "left"}}, 422),  # no submission id
        ({"json": submission(1, "left", extra="x")}, 422),
        ({"json": submission(1, "left", comment="x" * 2001)}, 422),
        ({"json": {**submission(1, "left"), "submission_id": "../../x"}}, 422),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422),
        ({"content": b"x" * 20_000, "headers": {"Content-Type": "application/json"}}, 413),
    ],
)
def test_bad_requests_get_4xx_never_500(store_with_people, request_kwargs, status):
    path, tokens = store_with_people
    client = TestClient(create_app(path), raise_server_exceptions=False)
    headers = {**auth(tokens["alice"]), **request_kwargs.pop("headers", {})}
    assert client.post("/api/judgements", headers=headers, **request_kwargs).status_code == status
    assert client.get("/api/pairs/99", headers=auth(tokens["alice"])).status_code == 404
    assert client.get("/api/pairs/abc", headers=auth(tokens["alice"])).status_code == 422


class LiveServer:
    """uvicorn serving the app on a free local port, in a thread."""

    def __init__(self, path):
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(path), host="127.0.0.1", port=self.port, log_level="warning", log_config=None)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def in_parallel(path, tokens, work):
    """work(client) for every token at once, each with its own HTTP client, against a live server."""

    def with_client(token):
        with httpx.Client(base_url=url, headers=auth(token), timeout=30) as client:
            work(client)

    with LiveServer(path) as url, ThreadPoolExecutor(len(tokens)) as pool:
        list(pool.map(with_client, tokens))


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
)


@contextmanager
def browser_page(path):
    """A headless Chromium page and the URL of a live server for the store at `path`."""
    playwright = pytest.importorskip("playwright.sync_api")
    with LiveServer(path) as url, playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield url, browser.new_page(viewport={"width": 1280, "height": 800})
        finally:
            browser.close()


def test_parallel_clients_store_every_judgement_exactly_once(tmp_path):
    path = tmp_path / "labels.db"
    store = LabelStore(path, create=True)
    for index in range(12):
        store.add_candidates(
            ({"role": "user", "content": f"Question {index}?"},), [("m", f"yes {index}"), ("m", f"no {index}")]
        )
    tokens = [store.add_annotator(f"annotator{i}") for i in range(4)]
    store.close()

    def label_everything(client):
        while (pair := client.get("/api/next").json())["pair_id"] is not None:
            body = submission(pair["pair_id"], "left")
            for _ in range(2):  # every submission is sent twice, as a retry would
                assert client.post("/api/judgements", json=body).status_code == 200

    in_parallel(path, tokens, label_everything)
    judgements = LabelStore(path).current_judgements()
    assert len(judgements) == 4 * 12 and len({(j.pair_id, j.annotator) for j in judgements}) == 4 * 12


@needs_chromium
def test_label_in_a_real_browser_by_click_and_keyboard(store_with_people, tmp_path):
    path, tokens = store_with_people
    with browser_page(path) as (url, page):
        # A slow network: the next pair arrives 0.3 s after a judgement is saved, the window in
        # which a key press used to be dropped (CI once saw "2 / 5" and pressed "2" too early).
        page.route("**/api/next", lambda route: (time.sleep(0.3), route.continue_()))
        page.goto(url)
        page.fill("#token", "not-a-token")
        page.click("#signin-button")
        page.wait_for_selector("text=Sign-in failed")
        page.fill("#token", tokens["alice"])
        page.click("#signin-button")
        page.wait_for_selector("#progress:has-text('0 / 5')")
        assert SCRIPT in page.inner_text("#left") + page.inner_text("#right")  # shown as text ...
        assert page.title() == "rlhfkit labeling"  # ... and never run
        shown = []  # (pair, screen choice) in the order labelled
        for action in ("click-left", "click-both-bad", "key-2", "key-3"):
            pair_id = 1 + len(shown)
            page.wait_for_selector("#choose-left:enabled")  # the page takes input again once the next pair is on screen
            if action.startswith("click"):
                page.click("#choose-" + action[6:])
                shown.append((pair_id, {"left": "left", "both-bad": "both_bad"}[action[6:]]))
            else:
                page.keyboard.press(action[-1])
                shown.append((pair_id, {"2": "right", "3": "tie"}[action[-1]]))
            page.wait_for_selector(f"#progress:has-text('{len(shown)} / 5')")
        page.screenshot(path=str(tmp_path / "labeling.png"))
    alice_id = LabelStore(path).annotator_for_token(tokens["alice"])[0]
    expected = {}
    for pair_id, screen in shown:
        left = left_response(alice_id, pair_id)
        expected[pair_id] = {"left": left, "right": "b" if left == "a" else "a"}.get(screen, screen)
    stored = {j.pair_id: j.choice for j in LabelStore(path).current_judgements()}
    assert stored == expected
    stats = export_preferences(str(path), str(tmp_path / "prefs.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert {row["pair_id"] for row in rows} == {p for p, choice in expected.items() if choice in ("a", "b")}
    assert stats["exported"] == len(rows) and stats["labelled"] == 4


def test_two_annotators_may_use_the_same_submission_id_and_a_reused_id_for_another_judgement_is_409(store_with_people):
    path, tokens = store_with_people
    client = TestClient(create_app(path))
    body = {"pair_id": 1, "choice": "left", "submission_id": "shared-id-1"}
    assert client.post("/api/judgements", json=body, headers=auth(tokens["alice"])).json()["stored"] is True
    bob = client.post("/api/judgements", json={**body, "pair_id": 2}, headers=auth(tokens["bob"]))
    assert bob.status_code == 200 and bob.json()["stored"] is True
    assert {(j.annotator, j.pair_id) for j in LabelStore(path).current_judgements()} == {("alice", 1), ("bob", 2)}
    conflict = client.post("/api/judgements", json={**body, "choice": "tie"}, headers=auth(tokens["alice"]))
    assert conflict.status_code == 409 and "shared-id-1" in conflict.json()["detail"]
    assert client.get("/api/judgements", headers=auth(tokens["alice"])).json()[0]["choice"] == left_response(
        LabelStore(path).annotator_for_token(tokens["alice"])[0], 1
    )


def run_asgi(app, method, path, headers, chunks):
    """Drive the app as a server would, with a request body arriving in `chunks` (no declared
    length, as with chunked transfer); returns (status, response headers, chunks the app pulled)."""
    import asyncio

    pulled, sent = [0], []

    async def receive():
        if pulled[0] < len(chunks):
            pulled[0] += 1
            return {"type": "http.request", "body": chunks[pulled[0] - 1], "more_body": pulled[0] < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, pulled[0]


def test_a_chunked_body_is_refused_once_past_the_limit_and_only_after_the_token_is_checked(store_with_people):
    path, tokens = store_with_people
    app = create_app(path)
    chunks = [b"x" * 1024] * 2000  # 2 MB, never declared
    status, _, pulled = run_asgi(app, "POST", "/api/judgements", {"Content-Type": "application/json"}, chunks)
    assert (status, pulled) == (401, 0)  # no token: not one byte of the body is read
    status, _, pulled = run_asgi(app, "POST", "/api/judgements", auth(tokens["alice"]), chunks)
    assert status == 413 and pulled == 17  # 16 KiB is the limit: the 17th KiB crosses it, and reading stops
    body = json.dumps(submission(1, "left")).encode()
    status, _, _ = run_asgi(
        app,
        "POST",
        "/api/judgements",
        {**auth(tokens["alice"]), "Content-Type": "application/json"},
        [body[:10], body[10:]],
    )
    assert status == 200 and LabelStore(path).current_judgements()[0].pair_id == 1


def test_ids_past_sqlites_range_are_422_not_500(store_with_people):
    path, tokens = store_with_people
    client = TestClient(create_app(path), raise_server_exceptions=False)
    for pair_id in (2**63, 2**64, -1):
        assert client.get(f"/api/pairs/{pair_id}", headers=auth(tokens["alice"])).status_code == 422
        assert (
            client.post("/api/judgements", json=submission(pair_id, "left"), headers=auth(tokens["alice"])).status_code
            == 422
        )
    assert client.get(f"/api/pairs/{2**63 - 1}", headers=auth(tokens["alice"])).status_code == 404


def test_every_response_carries_the_headers_a_public_form_needs(store_with_people):
    path, tokens = store_with_people
    client = TestClient(create_app(path))
    for response in (client.get("/"), client.get("/api/me", headers=auth(tokens["alice"])), client.get("/api/me")):
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy and "'unsafe-inline'" not in policy
        assert "script-src 'sha256-" in policy


def test_each_token_has_a_request_budget(store_with_people):
    path, tokens = store_with_people
    client = TestClient(create_app(path, rate=0.5, burst=3))
    codes = [client.get("/api/me", headers=auth(tokens["alice"])).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert client.get("/api/me", headers=auth(tokens["bob"])).status_code == 200  # Bob has his own budget
    refused = client.get("/api/me", headers=auth(tokens["alice"]))
    assert refused.headers["retry-after"] == "1"
