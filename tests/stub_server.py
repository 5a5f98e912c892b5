"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for failure modes a real server won't show."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion_body(content="Hello there.", choices=True):
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}] if choices else [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


class StubServer:
    """Loopback server that answers chat completions from a script of (status, body) replies."""

    def __init__(self, script):
        self.script = script if callable(script) else list(script)  # or a function of the request body
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                stub.auth_headers.append(self.headers.get("Authorization", ""))
                if callable(stub.script):
                    status, reply = stub.script(body)
                else:
                    status, reply = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "1")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self):
        self.server.shutdown()
