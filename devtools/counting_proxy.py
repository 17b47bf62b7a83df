"""An HTTP proxy on 127.0.0.1 that counts the requests it forwards.

Put in front of an MLflow tracking server, it tells how many calls a refresh, a listing or
a download really makes, measured on the wire rather than inferred from the code. Bodies
are forwarded byte for byte (compressed ones too); each request is answered in full
before the next one on its connection.
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
HOP_BY_HOP |= {"proxy-authorization", "proxy-authenticate", "host", "content-length"}


class CountingProxy:
    """Forwards everything to `upstream`; `calls` counts "METHOD /path" (no query)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=120)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def total(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()

    def count(self, call: str) -> None:
        with self._lock:
            self.calls[call] += 1


def _handler(proxy: CountingProxy) -> type[BaseHTTPRequestHandler]:
    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            proxy.count(f"{self.command} {self.path.split('?', 1)[0]}")
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            with proxy._client.stream(
                self.command, proxy.upstream + self.path, headers=headers, content=self._body()
            ) as response:
                body = b"".join(response.iter_raw())
                self.send_response(response.status_code)
                for key, value in response.headers.multi_items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline().strip():  # trailers, then the blank line
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, format: str, *args: object) -> None:
            pass  # counted, not logged

    return Forward
