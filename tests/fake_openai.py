"""A real HTTP server on 127.0.0.1 that speaks just enough of the OpenAI chat-completions API for judge tests.

It checks the credentials (a Bearer key, HTTP Basic from a URL's user part, or a key in the query), fails the first
requests with scripted status codes (to exercise retries), can send unparsable replies, answers the judge's
1-token endpoint check, answers rubric questions with a scripted judge, and records every request so tests can
count calls (the cache) and see both orders of each comparison (the position swap)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

def _texts(content: str) -> tuple[str, str, str] | None:
    """(prompt, a, b) from a rubric question: the JSON object the judge sends its texts in (None: not a question)."""
    try:
        texts = json.JSONDecoder().raw_decode(content)[0]
    except ValueError:
        return None
    if not isinstance(texts, dict) or set(texts) != {"user_prompt", "response_a", "response_b"}:
        return None
    return texts["user_prompt"], texts["response_a"], texts["response_b"]


def prefer_good(prompt: str, a: str, b: str) -> str:
    """The scripted judge: the response containing GOOD wins; both or neither tie."""
    ga, gb = "GOOD" in a, "GOOD" in b
    return "A" if ga and not gb else "B" if gb and not ga else "TIE"


class JsonHandler(BaseHTTPRequestHandler):
    """A request handler that answers JSON and keeps test output clean."""

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 (a free port), served while the `with` block runs."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeOpenAI(LocalServer):
    def __init__(self, key: str | None = None, *, basic: tuple[str, str] | None = None,
                 query_key: tuple[str, str] | None = None, decide: Callable[[str, str, str], str] = prefer_good,
                 fail_first: tuple[int, ...] = (), bad_replies: int = 0):
        self.key, self.basic, self.query_key, self.decide = key, basic, query_key, decide
        self.fail_queue, self.bad_replies = list(fail_first), bad_replies
        self.calls = 0  # every HTTP request
        self.probes = 0  # the judge's endpoint checks (any question that is not a rubric), answered
        self.answered = 0  # rubric questions answered with a verdict
        self.questions: list[tuple[str, str, str]] = []  # (prompt, A, B) of every answered request
        self.models: set[str] = set()
        self.lock = threading.Lock()
        super().__init__(self._handler())
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def authorized(self, headers, query: dict[str, list[str]]) -> bool:
        auth = headers.get("Authorization")
        if self.basic is not None:
            want = "Basic " + base64.b64encode(":".join(self.basic).encode()).decode()
            if auth != want:
                return False
        elif self.key is not None and auth != f"Bearer {self.key}":
            return False
        if self.query_key is not None and query.get(self.query_key[0]) != [self.query_key[1]]:
            return False
        return True

    def _handler(self):
        fake = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                parts = urlsplit(self.path)
                with fake.lock:
                    fake.calls += 1
                    if parts.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": "no such route"}})
                    if not fake.authorized(self.headers, parse_qs(parts.query)):
                        return self._send(401, {"error": {"message": "bad credentials"}})
                    if fake.fail_queue:
                        return self._send(fake.fail_queue.pop(0), {"error": {"message": "try again"}})
                    m = _texts(body["messages"][-1]["content"])
                    if m is None:  # the endpoint check: any short reply will do
                        fake.probes += 1
                        fake.models.add(body["model"])
                        return self._send(200, {"choices": [{"message": {"role": "assistant", "content": "A"}}]})
                    if fake.bad_replies:
                        fake.bad_replies -= 1
                        return self._send(200, {"choices": [{"message": {"content": "I think A is better."}}]})
                    prompt, a, b = m
                    fake.questions.append((prompt, a, b))
                    fake.models.add(body["model"])
                    fake.answered += 1
                    answer = fake.decide(prompt, a, b)
                return self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

        return Handler
