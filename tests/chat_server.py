"""An OpenAI-speaking chat server for tests (http.server on loopback): answers /v1/models and
/v1/chat/completions as an OpenAI server does, keeps every request body, and replies with a fixed
text or what ``reply(body)`` returns, so a test knows exactly what each request was answered."""

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, reply: str | Callable[[dict], str]):
        self.reply, self.requests = reply, []
        super().__init__(("127.0.0.1", 0), ChatHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, body: dict) -> str:
        return self.reply(body) if callable(self.reply) else self.reply


class ChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects of a server

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._send({"object": "list", "data": [{"id": "chat-test-model", "object": "model"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        self._send(
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.server.answer(body)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    def log_message(self, *args):
        pass
