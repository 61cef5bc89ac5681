"""The embedded py-evm chain served as JSON-RPC over HTTP on loopback.

``fedagg.ledger.embedded()`` is a chain inside one process; participants in
other processes need a node to talk to. This serves that chain on 127.0.0.1
(no service to install, nothing downloaded), one request at a time (the
eth-tester provider is not thread-safe). It is what ``fedagg demo`` runs; for
anything shared, run a real node (tested with Hardhat).

    python -m fedagg.ledger.node --accounts 40 --port 0     # prints the URL, serves until killed
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .._json import UntrustedJSONError, loads

MAX_REQUEST = 1 << 20  # bytes in one JSON-RPC request (a contract deployment is ~30 KB)
MAX_BATCH = 256  # requests in one batch


def _plain(value: Any) -> Any:
    """The provider's answer in JSON-RPC's encoding: integers and bytes as 0x-hex."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _error(exc: Exception) -> dict:
    """A JSON-RPC error; a revert carries its reason as Error(string) data, as real nodes send it."""
    msg = str(exc)
    if msg.startswith("execution reverted"):
        from eth_abi import encode

        reason = msg.partition(": ")[2]
        return {"code": 3, "message": msg, "data": "0x08c379a0" + encode(["string"], [reason]).hex()}
    return {"code": -32000, "message": f"{type(exc).__name__}: {msg}"}


class EmbeddedNode:
    """An in-process py-evm chain with `accounts` funded, unlocked dev accounts, served over HTTP.

    >>> node = EmbeddedNode(accounts=4)                               # doctest: +SKIP
    >>> w3 = fedagg.ledger.connect(node.url)                           # doctest: +SKIP
    >>> node.close()                                                    # doctest: +SKIP
    """

    def __init__(self, accounts: int = 40, host: str = "127.0.0.1", port: int = 0):
        from .evm import embedded

        if host not in ("127.0.0.1", "localhost"):
            raise ValueError("the embedded node serves loopback (127.0.0.1) only: its accounts are unlocked")
        self.w3 = embedded(accounts)
        # Only the provider's own middleware (eth-tester <-> JSON-RPC field names and defaults):
        # requests arrive already encoded by the caller's web3.
        self.w3.middleware_onion.clear()
        request = self.w3.provider.request_func(self.w3, self.w3.middleware_onion)
        lock = threading.Lock()
        hosts: set = set()  # Host headers accepted (filled in once the port is known)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: one connection per client, not one per call
            timeout = 30  # a client that stalls mid-request loses its connection, not a thread forever

            def log_message(self, *args):  # quiet: one line per request would drown the console
                pass

            def do_POST(self):
                # A web page can POST to loopback: only JSON from a non-browser on our own host name
                # (no Origin, Host 127.0.0.1:port or localhost:port; DNS rebinding changes Host).
                if self.headers.get("Origin") is not None or self.headers.get("Host") not in hosts:
                    return self._fail(403, -32600, "only local, non-browser clients")
                if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                    return self._fail(415, -32600, "Content-Type must be application/json")
                try:
                    size = int(self.headers.get("Content-Length") or "")
                except ValueError:
                    return self._fail(411, -32600, "Content-Length required")
                if not 0 < size <= MAX_REQUEST:
                    return self._fail(413, -32600, f"request size must be in (0, {MAX_REQUEST}]")
                try:
                    req = loads(self.rfile.read(size), MAX_REQUEST)
                except UntrustedJSONError as e:
                    return self._fail(400, -32700, f"parse error: {e}")
                batch = isinstance(req, list)
                if batch and not 0 < len(req) <= MAX_BATCH:
                    return self._fail(400, -32600, f"a batch holds 1 to {MAX_BATCH} requests")
                out = [self._one(r) for r in (req if batch else [req])]
                self._reply(200, out if batch else out[0])

            def _one(self, req):
                if not isinstance(req, dict) or not isinstance(req.get("method"), str):
                    return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "invalid request"}}
                params = req.get("params") or []
                if not isinstance(params, list):
                    return {"jsonrpc": "2.0", "id": req.get("id"),
                            "error": {"code": -32602, "message": "params must be a list"}}
                try:
                    with lock:
                        resp = dict(request(req["method"], params))
                except Exception as e:  # noqa: BLE001 - the error goes back to the caller, the node stays up
                    resp = {"error": _error(e)}
                if "result" in resp:
                    resp["result"] = _plain(resp["result"])
                resp.update(jsonrpc="2.0", id=req.get("id"))
                return resp

            def _fail(self, status, code, message):
                self.close_connection = True
                self._reply(status, {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}})

            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # many participants connect at once; the default 5 resets them

        self.httpd = Server((host, int(port)), Handler)
        port = self.httpd.server_address[1]
        hosts.update({f"127.0.0.1:{port}", f"localhost:{port}"})
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fedagg-node", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedagg.ledger.node", description=__doc__.split("\n\n")[0])
    ap.add_argument("--accounts", type=int, default=40)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--until-stdin-closes", action="store_true", help="exit when stdin reaches EOF")
    args = ap.parse_args(argv)
    node = EmbeddedNode(args.accounts, port=args.port)
    print(node.url, flush=True)
    try:
        if args.until_stdin_closes:  # the parent holds our stdin: when it exits, however it exits, so do we
            sys.stdin.buffer.read()
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
