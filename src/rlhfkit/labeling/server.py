"""`rlhfkit label serve STORE`: the labeling page and its JSON API (FastAPI, served by uvicorn).

Annotators sign in with the token `rlhfkit label annotator` printed (sent as `Authorization:
Bearer TOKEN`). The page shows a prompt and two responses; which stored response is on the left
is fixed per annotator and pair by a hash (so a reload shows the same order) and recorded with
the judgement. The client answers in screen terms (left, right, tie, both_bad); the server maps
them to A/B. Each request opens its own SQLite connection; the store's transactions make
parallel submissions safe. Bodies over the size limit get 413, bad input 422, unknown pairs 404, and a submission id the
annotator already used for a different judgement 409.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rlhfkit.labeling.store import LabelStore, SubmissionConflict

MAX_BODY_BYTES = 16_384
PAGE = Path(__file__).with_name("page.html")


class Submission(BaseModel):
    """A judgement as the page sends it: screen terms, a comment, and the client's submission id."""

    model_config = ConfigDict(extra="forbid")
    pair_id: int = Field(gt=0)
    choice: Literal["left", "right", "tie", "both_bad"]
    comment: str = Field("", max_length=2000)
    submission_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")


def left_response(annotator_id: int, pair_id: int) -> str:
    """'a' or 'b': the stored response shown on the left to this annotator, stable across reloads."""
    return "a" if hashlib.sha256(f"{annotator_id}:{pair_id}".encode()).digest()[0] % 2 == 0 else "b"


def create_app(store_path: str | Path, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app serving one store."""
    from fastapi import Depends, FastAPI, Header, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    LabelStore(store_path).close()  # fail at start, not on the first request, if the store is missing
    app = FastAPI(title="rlhfkit labeling", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            return JSONResponse({"detail": f"request body over {max_body_bytes} bytes"}, status_code=413)
        if request.method == "POST" and declared is None:
            body = await request.body()  # chunked: read it, but no further than the limit allows
            if len(body) > max_body_bytes:
                return JSONResponse({"detail": f"request body over {max_body_bytes} bytes"}, status_code=413)
        return await call_next(request)

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

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/me")
    def me(who=Depends(annotator), db: LabelStore = Depends(store)) -> dict:
        done, total = db.progress(who[0])
        return {"name": who[1], "progress": {"done": done, "total": total}}

    @app.get("/api/next")
    def next_pair(who=Depends(annotator), db: LabelStore = Depends(store)) -> dict:
        pair_id = db.next_pair_id(who[0])
        if pair_id is None:
            done, total = db.progress(who[0])
            return {"pair_id": None, "progress": {"done": done, "total": total}}
        return shown(db, who, pair_id)

    @app.get("/api/pairs/{pair_id}")
    def get_pair(pair_id: int, who=Depends(annotator), db: LabelStore = Depends(store)) -> dict:
        return shown(db, who, pair_id)

    @app.get("/api/judgements")
    def my_judgements(who=Depends(annotator), db: LabelStore = Depends(store)) -> list[dict]:
        return db.judgements_of(who[0])

    @app.post("/api/judgements")
    def submit(submission: Submission, who=Depends(annotator), db: LabelStore = Depends(store)) -> dict:
        left = left_response(who[0], submission.pair_id)
        right = "b" if left == "a" else "a"
        choice = {"left": left, "right": right}.get(submission.choice, submission.choice)
        try:
            stored = db.submit(submission.pair_id, who[0], choice, left, submission.submission_id, submission.comment)
        except KeyError:
            raise HTTPException(status_code=404, detail=f"no pair {submission.pair_id}") from None
        except SubmissionConflict as conflict:
            raise HTTPException(status_code=409, detail=str(conflict)) from None
        done, total = db.progress(who[0])
        return {"stored": stored, "progress": {"done": done, "total": total}}

    return app


def serve(store_path: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = create_app(store_path)
    print(f"labeling page on http://{host}:{port}/  (sign in with a token from `rlhfkit label annotator`)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
