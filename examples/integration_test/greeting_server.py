"""A tiny HTTP service, the kind of server a library's integration tests run against.

``serve()`` binds an ephemeral port, tells the program that started it which one with
``bgtask.ready(port)``, and serves until it is stopped; its ``finally`` block runs then.
"""

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import bgtask


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path != "/greet":
            self.send_error(404)
            return
        name = parse_qs(url.query).get("name", ["world"])[0]
        body = json.dumps({"greeting": f"hello {name}"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output quiet


def serve(host: str = "127.0.0.1") -> None:
    """Serve greetings on an ephemeral port until stopped."""
    server = ThreadingHTTPServer((host, 0), _Handler)
    try:
        bgtask.ready(server.server_address[1])
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
