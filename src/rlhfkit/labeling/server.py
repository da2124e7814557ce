"""`rlhfkit label serve STORE`: the labeling page and its JSON API (FastAPI, served by uvicorn).

Annotators sign in with the token `rlhfkit label annotator` printed (sent as `Authorization:
Bearer TOKEN`). In a pairwise store the page shows a prompt and two responses; which stored
response is on the left is fixed per annotator and pair by a hash (so a reload shows the same
order) and recorded with the judgement. The client answers in screen terms (left, right, tie,
both_bad); the server maps them to A/B. In a single-answer store it shows one response, labelled
👍 or 👎 with an optional 1–5 rating (`/api/verdicts`); a label for a task of the other kind is
refused with 409. Each request opens its own SQLite connection; the store's transactions make
parallel submissions safe. Every API request is authenticated before its body is read; bodies over the size limit get 413
(counted while reading), a token over its request rate 429, bad input 422, unknown pairs 404,
and a submission id the annotator already used for a different judgement 409.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rlhfkit.errors import UserError
from rlhfkit.labeling.store import LabelStore, SubmissionConflict, WrongTaskKind, hash_token

MAX_BODY_BYTES = 16_384
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger id is refused (422), never an overflow (500)
REQUESTS_PER_SECOND, BURST = 20.0, 100  # each token's budget: a person labels far slower, a script cannot flood
PAGE = Path(__file__).with_name("page.html")


def _json(status: int, detail: str, headers: dict[str, str] | None = None) -> tuple[int, list, bytes]:
    body = json.dumps({"detail": detail}).encode()
    header_list = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return status, header_list + [(k.encode(), v.encode()) for k, v in (headers or {}).items()], body


def security_headers() -> list[tuple[bytes, bytes]]:
    """What a public form sends with every response: a CSP allowing only the page's own inline
    script and style (by hash) and requests to this origin, no framing, no MIME sniffing."""
    page = PAGE.read_text(encoding="utf-8")

    def inline_hash(tag: str) -> str:
        inner = page.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        return "'sha256-" + base64.b64encode(hashlib.sha256(inner.encode("utf-8")).digest()).decode() + "'"

    policy = (
        f"default-src 'none'; script-src {inline_hash('script')}; style-src {inline_hash('style')}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    values = {
        "content-security-policy": policy,
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cache-control": "no-store",
    }
    return [(name.encode(), value.encode()) for name, value in values.items()]


class Guard:
    """ASGI middleware in front of the app: security headers on every response; for the API, the
    token checked before any body is read (401), each token's request rate limited (429), and a
    body refused (413) as soon as it passes the limit, whether its length is declared or chunked."""

    def __init__(self, app, store_path: str | Path, max_body_bytes: int, rate: float, burst: int) -> None:
        self.app, self.store_path, self.max_body_bytes, self.rate, self.burst = (
            app,
            store_path,
            max_body_bytes,
            rate,
            burst,
        )
        self.headers = security_headers()
        self.buckets: dict[str, tuple[float, float]] = {}  # token hash -> (tokens left, last refill time)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        refusal, receive = await self.check(scope, receive)
        if refusal is not None:
            status, headers, body = refusal
            await send_with_headers({"type": "http.response.start", "status": status, "headers": headers})
            await send_with_headers({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send_with_headers)

    async def check(self, scope, receive):
        """(refusal or None, the receive to hand on): a refusal is (status, headers, body)."""
        if not scope["path"].startswith("/api/"):
            return None, receive
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        authorization = headers.get("authorization", "")
        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        store = LabelStore(self.store_path)
        try:
            known = bool(token) and store.annotator_for_token(token) is not None
        finally:
            store.close()
        if not known:
            return _json(401, "sign in with your annotator token", {"WWW-Authenticate": "Bearer"}), receive
        if not self.take(hash_token(token)):
            return _json(429, "too many requests; slow down", {"Retry-After": "1"}), receive
        declared = headers.get("content-length")
        too_big = _json(413, f"request body over {self.max_body_bytes} bytes")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return too_big, receive
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None, receive
        chunks, size = [], 0
        while True:  # read no further than the limit allows
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, receive
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return too_big, receive
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay

    def take(self, key: str) -> bool:
        """Token bucket per annotator: `burst` requests at once, refilled at `rate` per second."""
        now = time.monotonic()
        left, last = self.buckets.get(key, (float(self.burst), now))
        left = min(float(self.burst), left + (now - last) * self.rate)
        if left < 1:
            self.buckets[key] = (left, now)
            return False
        self.buckets[key] = (left - 1, now)
        return True


class Submission(BaseModel):
    """A judgement as the page sends it: screen terms, a comment, and the client's submission id."""

    model_config = ConfigDict(extra="forbid")
    pair_id: int = Field(gt=0, le=MAX_ID)
    choice: Literal["left", "right", "tie", "both_bad"]
    comment: str = Field("", max_length=2000)
    submission_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")


class VerdictSubmission(BaseModel):
    """A 👍/👎 label of a single answer, an optional 1-5 rating and comment, and the client's submission id."""

    model_config = ConfigDict(extra="forbid")
    answer_id: int = Field(gt=0, le=MAX_ID)
    label: Literal["up", "down"]
    rating: int | None = Field(None, ge=1, le=5)
    comment: str = Field("", max_length=2000)
    submission_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")


def left_response(annotator_id: int, pair_id: int) -> str:
    """'a' or 'b': the stored response shown on the left to this annotator, stable across reloads."""
    return "a" if hashlib.sha256(f"{annotator_id}:{pair_id}".encode()).digest()[0] % 2 == 0 else "b"


def create_app(
    store_path: str | Path, max_body_bytes: int = MAX_BODY_BYTES, rate: float = REQUESTS_PER_SECOND, burst: int = BURST
):
    """The FastAPI app serving one store (rate, burst: each token's request budget, see Guard)."""
    from fastapi import Depends, FastAPI, Header, HTTPException
    from fastapi import Path as PathParameter
    from fastapi.responses import HTMLResponse

    LabelStore(store_path).close()  # fail at start, not on the first request, if the store is missing
    app = FastAPI(title="rlhfkit labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, store_path=store_path, max_body_bytes=max_body_bytes, rate=rate, burst=burst)

    def store():
        opened = LabelStore(store_path)
        try:
            yield opened
        finally:
            opened.close()

    def annotator(authorization: str | None = Header(None), db: LabelStore = Depends(store)) -> tuple[int, str]:
        token = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
        found = db.annotator_for_token(token) if token else None
        if found is None:
            raise HTTPException(
                status_code=401, detail="sign in with your annotator token", headers={"WWW-Authenticate": "Bearer"}
            )
        return found

    def shown(db: LabelStore, who: tuple[int, str], pair_id: int) -> dict:
        pair = db.pair(pair_id)
        if pair is None:
            raise HTTPException(status_code=404, detail=f"no pair {pair_id}")
        left = left_response(who[0], pair_id)
        texts = {"a": pair.response_a, "b": pair.response_b}
        done, total = db.progress(who[0])
        return {
            "pair_id": pair_id,
            "prompt": list(pair.prompt),
            "left": texts[left],
            "right": texts["b" if left == "a" else "a"],
            "progress": {"done": done, "total": total},
        }

    def shown_answer(db: LabelStore, who: tuple[int, str], answer_id: int) -> dict:
        answer = db.answer(answer_id)
        if answer is None:
            raise HTTPException(status_code=404, detail=f"no answer {answer_id}")
        done, total = db.progress(who[0])
        return {
            "answer_id": answer_id,
            "prompt": list(answer.prompt),
            "response": answer.response,
            "progress": {"done": done, "total": total},
        }

    def stored(db: LabelStore, who: tuple[int, str], submit, missing: str) -> dict:
        """Store a label (submit() -> whether it was new) and answer with the progress; an unknown
        task is 404, a reused submission id or a label of the other task kind 409."""
        try:
            new = submit()
        except KeyError:
            raise HTTPException(status_code=404, detail=missing) from None
        except (SubmissionConflict, WrongTaskKind) as conflict:
            raise HTTPException(status_code=409, detail=str(conflict)) from None
        done, total = db.progress(who[0])
        return {"stored": new, "progress": {"done": done, "total": total}}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/me")
    def me(who=Depends(annotator), db: LabelStore = Depends(store)) -> dict:
        done, total = db.progress(who[0])
        return {"name": who[1], "kind": db.kind, "progress": {"done": done, "total": total}}

    @app.get("/api/next")
    def next_pair(who=Depends(annotator), db: LabelStore = Depends(store)) -> dict:
        task_id = db.next_task_id(who[0])
        key = "answer_id" if db.kind == "single" else "pair_id"
        if task_id is None:
            done, total = db.progress(who[0])
            return {key: None, "progress": {"done": done, "total": total}}
        return shown_answer(db, who, task_id) if db.kind == "single" else shown(db, who, task_id)

    @app.get("/api/pairs/{pair_id}")
    def get_pair(
        pair_id: int = PathParameter(gt=0, le=MAX_ID), who=Depends(annotator), db: LabelStore = Depends(store)
    ) -> dict:
        return shown(db, who, pair_id)

    @app.get("/api/judgements")
    def my_judgements(who=Depends(annotator), db: LabelStore = Depends(store)) -> list[dict]:
        return db.judgements_of(who[0])

    @app.post("/api/judgements")
    def submit(submission: Submission, who=Depends(annotator), db: LabelStore = Depends(store)) -> dict:
        left = left_response(who[0], submission.pair_id)
        right = "b" if left == "a" else "a"
        choice = {"left": left, "right": right}.get(submission.choice, submission.choice)
        return stored(
            db,
            who,
            lambda: db.submit(submission.pair_id, who[0], choice, left, submission.submission_id, submission.comment),
            f"no pair {submission.pair_id}",
        )

    @app.get("/api/answers/{answer_id}")
    def get_answer(
        answer_id: int = PathParameter(gt=0, le=MAX_ID), who=Depends(annotator), db: LabelStore = Depends(store)
    ) -> dict:
        return shown_answer(db, who, answer_id)

    @app.get("/api/verdicts")
    def my_verdicts(who=Depends(annotator), db: LabelStore = Depends(store)) -> list[dict]:
        return db.verdicts_of(who[0])

    @app.post("/api/verdicts")
    def submit_verdict(submission: VerdictSubmission, who=Depends(annotator), db: LabelStore = Depends(store)) -> dict:
        return stored(
            db,
            who,
            lambda: db.submit_verdict(
                submission.answer_id,
                who[0],
                submission.label,
                submission.submission_id,
                submission.rating,
                submission.comment,
            ),
            f"no answer {submission.answer_id}",
        )

    return app


def serve(store_path: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = create_app(store_path)
    print(f"labeling page on http://{host}:{port}/  (sign in with a token from `rlhfkit label annotator`)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


class BackgroundServer:
    """The labeling page served by uvicorn in a thread while the caller waits for labels (the
    pipeline's `label` stage); a context manager that stops the server on exit, however it ends."""

    def __init__(self, store_path: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
        import uvicorn

        self.url = f"http://{host}:{port}/"
        # log_config=None: uvicorn's dictConfig would shut down (and so close) every logging handler
        # the process already has, the caller's own among them
        config = uvicorn.Config(create_app(store_path), host=host, port=port, log_level="warning", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            self.server.should_exit = True
            raise UserError(f"the labeling page could not start on {self.url} (is the port in use? set people.port)")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
