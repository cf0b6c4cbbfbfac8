"""A test judge: a real OpenAI-compatible HTTP server on 127.0.0.1 that grades tiny-task answers
by the task's own rule (the answer names the right digit and no other), in the format the
request asks for: FastChat's `[[rating]]` (single), `[[A]]`/`[[B]]`/`[[C]]` (pairwise), or a
JSON object of criteria (from the request's response_format schema, else from the rubric text).

    with JudgeServer(faults={"1 9 2 7": "429"}) as judge:
        ... eval.judge.base_url={judge.url} ...
        judge.count()  # chat requests received

Faults are keyed by a piece of the question's text:
- transient, on the first request of each distinct body only (a retry then succeeds):
  `429` (with Retry-After), `500`, `slow` (answers after `slow_s`, past the client's timeout);
- persistent: `garbled` (a 200 whose body is not JSON), `no_rating` (an answer without a
  rating, verdict or JSON object).
`latency_s` delays every answer (the throughput benchmark).
"""

import asyncio
import hashlib
import json
import re
import socket
import threading
import time

QUESTION = re.compile(r"Which is the (largest|smallest): (\d) (\d) (\d) (\d)\?")
TRANSIENT = ("429", "500", "slow")


def correct(question: str, answer: str) -> bool:
    """The tiny task's rule: the answer names the right digit and no other."""
    found = QUESTION.search(question)
    if not found:
        return False
    digits = [int(d) for d in found.groups()[1:]]
    wanted = max(digits) if found.group(1) == "largest" else min(digits)
    return re.findall(r"\d", answer) == [str(wanted)]


def _between(text: str, start: str, end: str) -> str | None:
    found = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, re.DOTALL)
    return found.group(1) if found else None


def grade(body: dict) -> str:
    """The judge's answer to one chat request."""
    messages = body.get("messages", [])
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    question = (_between(user, "[Question]", "\n[") or _between(user, "[User Question]", "\n[")
                or user)
    if "[The Start of Assistant A's Answer]" in user:
        a = correct(question, _between(user, "[The Start of Assistant A's Answer]",
                                       "[The End of Assistant A's Answer]") or "")
        b = correct(question, _between(user, "[The Start of Assistant B's Answer]",
                                       "[The End of Assistant B's Answer]") or "")
        verdict = "A" if a and not b else "B" if b and not a else "C"
        return f"Comparing both answers against the rule. Final verdict: [[{verdict}]]"
    answer = _between(user, "[The Start of Assistant's Answer]",
                      "[The End of Assistant's Answer]") or ""
    ok = correct(question, answer)
    names = _criteria(body, system)
    if names:
        return json.dumps({name: (high if ok else low) if "correct" in name else (low + high) // 2
                           for name, (low, high) in names.items()})
    return f"The answer is {'right' if ok else 'wrong'}. Rating: [[{9 if ok else 2}]]"


def _criteria(body: dict, system: str) -> dict[str, tuple[int, int]]:
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
    if schema:
        return {name: (spec.get("minimum", 1), spec.get("maximum", 5))
                for name, spec in schema.get("properties", {}).items()}
    return {name: (int(low), int(high))
            for name, low, high in re.findall(r'"(\w+)": <(\d+)-(\d+)>', system)}


class JudgeServer:
    def __init__(self, faults: dict[str, str] | None = None, latency_s: float = 0.0,
                 slow_s: float = 5.0, accepts_response_format: bool = True):
        self.faults = dict(faults or {})
        self.latency_s, self.slow_s = latency_s, slow_s
        self.accepts_response_format = accepts_response_format
        self.requests: list[tuple[str, str]] = []  # (fault or "ok", question), every request
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for found, _ in self.requests if kind is None or found == kind)

    def _app(self):
        from fastapi import FastAPI, Request  # noqa: F401 (FastAPI reads the annotation)
        from fastapi.responses import JSONResponse, PlainTextResponse

        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "test-judge", "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            text = json.dumps(body.get("messages"))
            fault = next((kind for piece, kind in self.faults.items() if piece in text), None)
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            with self._lock:
                first = digest not in self._seen
                self._seen.add(digest)
                if fault in TRANSIENT and not first:
                    fault = None
                self.requests.append((fault or "ok", text[:200]))
            if body.get("response_format") and not self.accepts_response_format:
                return JSONResponse({"error": {"message": "response_format is not supported"}},
                                    status_code=400)
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if fault == "429":
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                                    headers={"Retry-After": "0.2"})
            if fault == "500":
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            if fault == "slow":
                await asyncio.sleep(self.slow_s)
            if fault == "garbled":
                return PlainTextResponse("{not json", media_type="application/json")
            content = "I would rather not say." if fault == "no_rating" else grade(body)
            return {"id": "judge-" + digest[:8], "object": "chat.completion",
                    "created": int(time.time()), "model": body.get("model", "test-judge"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": len(text) // 4,
                              "completion_tokens": len(content) // 4,
                              "total_tokens": (len(text) + len(content)) // 4}}

        return app

    def __enter__(self) -> "JudgeServer":
        import uvicorn

        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test judge did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
