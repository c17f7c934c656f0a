"""A real HTTP server on 127.0.0.1 that speaks just enough of the OpenAI chat-completions API for judge tests.

It checks the Authorization header, fails the first requests with scripted status codes (to exercise retries),
can send unparsable replies, answers with a scripted judge, and records every request so tests can count calls
(the cache) and see both orders of each comparison (the position swap)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

_USER = re.compile(r"\[User prompt\]\n(.*)\n\n\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nWhich", re.S)


def prefer_good(prompt: str, a: str, b: str) -> str:
    """The scripted judge: the response containing GOOD wins; both or neither tie."""
    ga, gb = "GOOD" in a, "GOOD" in b
    return "A" if ga and not gb else "B" if gb and not ga else "TIE"


class FakeOpenAI:
    def __init__(self, key: str, *, decide: Callable[[str, str, str], str] = prefer_good,
                 fail_first: tuple[int, ...] = (), bad_replies: int = 0):
        self.key, self.decide = key, decide
        self.fail_queue, self.bad_replies = list(fail_first), bad_replies
        self.calls = 0  # every HTTP request
        self.answered = 0  # requests answered with a verdict
        self.questions: list[tuple[str, str, str]] = []  # (prompt, A, B) of every answered request
        self.models: set[str] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with fake.lock:
                    fake.calls += 1
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": "no such route"}})
                    if self.headers.get("Authorization") != f"Bearer {fake.key}":
                        return self._send(401, {"error": {"message": "bad key"}})
                    if fake.fail_queue:
                        return self._send(fake.fail_queue.pop(0), {"error": {"message": "try again"}})
                    if fake.bad_replies:
                        fake.bad_replies -= 1
                        return self._send(200, {"choices": [{"message": {"content": "I think A is better."}}]})
                    m = _USER.search(body["messages"][-1]["content"])
                    assert m, body
                    prompt, a, b = m.groups()
                    fake.questions.append((prompt, a, b))
                    fake.models.add(body["model"])
                    fake.answered += 1
                    answer = fake.decide(prompt, a, b)
                return self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

        return Handler
