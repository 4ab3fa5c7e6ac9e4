"""`medjax rag serve`: answers with cited sources over HTTP, from an index and an OpenAI-compatible
LLM server (`medjax serve`, i.e. vLLM).

POST /v1/ask retrieves the top chunks, builds the prompt with tasks.prompts.question_prompt (the
same numbered, quoted passages as `medjax eval --rag`), asks the LLM's chat endpoint, and returns
the answer with the passages it was shown as sources: [n] in the answer is sources[n-1]. POST
/v1/search returns the chunks alone; GET / is a one-file page for people.

Guards, because a retrieval service is easy to expose by mistake: loopback by default; when the
configured environment variable holds a key, every /v1 request must carry it (Bearer or X-API-Key);
a POST must declare its length (411) and stay under serve.max_request_bytes (413); each client
address gets serve.rate_limit (429 with Retry-After, counted by the `limits` package). Every error
is JSON {"detail": "..."} that says what to change.
"""

from __future__ import annotations

import hmac
import os
import re
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from medjax.rag.config import RagConfig, ServiceConfig
from medjax.rag.corpus import RagError

API_PREFIX = "/v1/"
_CITATION = re.compile(r"\[(\d{1,3})\]")


class Query(BaseModel):
    """A request body of /v1/ask and /v1/search; any other field is refused."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    k: int | None = Field(default=None, ge=1)  # at most serve.max_k
    mode: Literal["sparse", "dense", "hybrid"] | None = None
    filters: dict[str, str] = Field(default_factory=dict)


def cited_numbers(answer: str, sources: int) -> list[int]:
    """The passage numbers an answer cites, in first-use order; numbers past the list are not sources."""
    out: list[int] = []
    for m in _CITATION.finditer(answer):
        n = int(m.group(1))
        if 1 <= n <= sources and n not in out:
            out.append(n)
    return out


class BodyLimit:
    """ASGI guard before FastAPI reads a body: a POST must say its Content-Length (uvicorn then
    delivers no more than that) and it must be within the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is None:
                return await _reply(send, 411, "send the request with a Content-Length header")
            if not length.isdigit() or int(length) > self.max_bytes:
                return await _reply(
                    send,
                    413,
                    f"request body of {length.decode(errors='replace')} bytes; "
                    f"this service takes at most {self.max_bytes}",
                )
        return await self.app(scope, receive, send)


async def _reply(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LanguageModel:
    """The chat endpoint of an OpenAI-compatible server; the model name is asked once if not set."""

    def __init__(self, url: str, cfg: ServiceConfig):
        import httpx

        self.url, self.cfg, self.name = url.rstrip("/"), cfg, cfg.model or None
        self.client = httpx.AsyncClient(timeout=cfg.timeout_s)

    async def model_name(self) -> str:
        if self.name is None:
            r = await self.client.get(f"{self.url}/v1/models")
            r.raise_for_status()
            data = r.json().get("data") or []
            if not data:
                raise RagError(f"{self.url}/v1/models lists no model")
            self.name = data[0]["id"]
        return self.name

    async def answer(self, prompt: str) -> tuple[str, dict]:
        body = {
            "model": await self.model_name(),
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.cfg.max_tokens,
            "temperature": self.cfg.temperature,
        }
        r = await self.client.post(f"{self.url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RagError(f"the language model at {self.url} answered {r.status_code}: {r.text[:300]}")
        data = r.json()
        return data["choices"][0]["message"]["content"] or "", data.get("usage") or {}


def create_app(index, llm_url: str | None, cfg: RagConfig):
    """The FastAPI app over an open RagIndex; ``llm_url`` None serves search only (/v1/ask is 503)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from limits import parse_many, storage, strategies

    from medjax.rag.search import passage_text
    from medjax.tasks.prompts import PromptConfig, fit_passages, question_prompt

    s = cfg.serve
    api_key = os.environ.get(s.api_key_env) if s.api_key_env else None
    rates = parse_many(s.rate_limit) if s.rate_limit else []
    limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
    search_lock = threading.Lock()  # bm25s, faiss and the encoder are not shared across threads
    llm = LanguageModel(llm_url, s) if llm_url else None
    page = resources.files("medjax.rag").joinpath("page.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if llm is not None:
            await llm.client.aclose()

    app = FastAPI(title="medjax RAG", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith(API_PREFIX):
            if api_key is not None:
                given = request.headers.get("x-api-key") or ""
                auth = request.headers.get("authorization") or ""
                if auth.lower().startswith("bearer "):
                    given = auth[7:].strip()
                if not hmac.compare_digest(given.encode(), api_key.encode()):
                    return JSONResponse(
                        {"detail": "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')"},
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
            client = request.client.host if request.client else "unknown"
            for rate in rates:
                if not limiter.hit(rate, "client", client):
                    reset = limiter.get_window_stats(rate, "client", client).reset_time
                    wait = max(1, int(reset - time.time() + 0.999))
                    return JSONResponse(
                        {"detail": f"rate limit of {rate} per client exceeded; retry in {wait} s"},
                        status_code=429,
                        headers={"Retry-After": str(wait)},
                    )
        return await call_next(request)

    def retrieve(q: Query):
        if len(q.question) > s.max_question_chars:
            raise HTTPException(422, f"question: {len(q.question)} characters; at most {s.max_question_chars}")
        if q.k is not None and q.k > s.max_k:
            raise HTTPException(422, f"k: {q.k} passages asked; at most {s.max_k} (serve.max_k)")
        try:
            with search_lock:
                return index.search(q.question, k=q.k or s.k, mode=q.mode, filters=q.filters)
        except RagError as e:
            raise HTTPException(400, str(e)) from None

    @app.get("/", response_class=HTMLResponse)
    async def home():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info():
        return {
            "index": str(index.dir),
            "chunks": len(index),
            "dense": index.dense is not None,
            "llm": llm.url if llm else None,
            "k": s.k,
            "max_k": s.max_k,
            "api_key": api_key is not None,
        }

    @app.post("/v1/search")
    async def search(q: Query):
        hits = await run_in_threadpool(retrieve, q)
        return {"question": q.question, "hits": [h.to_json() for h in hits]}

    @app.post("/v1/ask")
    async def ask(q: Query):
        if llm is None:
            raise HTTPException(503, "this service was started without --llm; use /v1/search")
        t0 = time.perf_counter()
        hits = await run_in_threadpool(retrieve, q)
        passages = [passage_text(h.chunk) for h in hits]
        budget = PromptConfig.passage_budget
        shown = fit_passages(passages, budget)
        prompt = question_prompt(q.question, passages, budget)
        t1 = time.perf_counter()
        try:
            answer, usage = await llm.answer(prompt)
        except RagError as e:
            raise HTTPException(502, str(e)) from None
        except Exception as e:  # httpx: refused, timed out
            raise HTTPException(
                502, f"the language model at {llm.url} could not be reached: {type(e).__name__}: {e}"
            ) from None
        sources = [{"n": n, **h.to_json(), "shown": text} for n, (h, text) in enumerate(zip(hits, shown), 1)]
        return {
            "question": q.question,
            "answer": answer,
            "sources": sources,
            "cited": cited_numbers(answer, len(sources)),
            "model": llm.name,
            "usage": usage,
            "retrieval_ms": round((t1 - t0) * 1000, 1),
            "generation_ms": round((time.perf_counter() - t1) * 1000, 1),
        }

    return BodyLimit(app, s.max_request_bytes)


def check_llm(url: str, timeout_s: float = 5.0) -> str:
    """The first model the OpenAI server at ``url`` lists; a clear error when nothing answers there."""
    import httpx

    try:
        r = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=timeout_s)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except Exception as e:
        raise RagError(
            f"--llm {url}: no OpenAI-compatible server answers there ({type(e).__name__}: {e}); "
            "start one with `medjax serve HF_DIR`, or pass --no-llm to serve search only"
        ) from None


def serve(index_dir: str, cfg: RagConfig, llm_url: str | None, echo=print) -> int:
    import uvicorn

    from medjax.rag.search import RagIndex

    s = cfg.serve
    index = RagIndex(index_dir, cfg)
    if llm_url:
        name = check_llm(llm_url)
        s.model = s.model or name
        echo(f"answers by {s.model} at {llm_url}")
    if s.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(s.api_key_env or ""):
        echo(f"warning: listening on {s.host} with no API key (set {s.api_key_env} to require one)")
    echo(f"medjax rag serve: {len(index):,} chunks of {index_dir} at http://{s.host}:{s.port}/")
    uvicorn.run(create_app(index, llm_url, cfg), host=s.host, port=s.port, log_level="warning")
    return 0
