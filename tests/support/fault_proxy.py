"""A loopback HTTP proxy that injects faults between a client and an S3 server.

    python3 tests/support/fault_proxy.py --upstream http://127.0.0.1:8333 --seed 7

Prints `listening PORT` once ready. Per request, drawn from a seeded generator:
  --p503    answer 503 without forwarding                       (default 0.10)
  --plost   forward (the write lands), then answer 500           (default 0.05)
  --preset  close the connection without an answer               (default 0.01)
  --pstall  forward after a stall of --stall seconds             (default 0.01)
Counts of each fault are printed to stderr when the proxy is stopped (SIGTERM).
Only ever connects to the loopback upstream it was given.
"""

import argparse
import http.client
import http.server
import random
import signal
import socket
import sys
import threading
import time
import urllib.parse

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p503", type=float, default=0.10)
    ap.add_argument("--plost", type=float, default=0.05)
    ap.add_argument("--preset", type=float, default=0.01)
    ap.add_argument("--pstall", type=float, default=0.01)
    ap.add_argument("--stall", type=float, default=2.0)
    args = ap.parse_args()
    up = urllib.parse.urlsplit(args.upstream)
    if up.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("error: the upstream must be on the loopback interface")
    rng = random.Random(args.seed)
    lock = threading.Lock()
    counts = {"requests": 0, "503": 0, "lost_ack": 0, "reset": 0, "stall": 0}

    def draw() -> str:
        with lock:
            counts["requests"] += 1
            x = rng.random()
        for name, p in (("503", args.p503), ("lost_ack", args.plost), ("reset", args.preset), ("stall", args.pstall)):
            if x < p:
                with lock:
                    counts[name] += 1
                return name
            x -= p
        return "pass"

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = draw()
            if fault == "503":
                return self.reply(503, {"Content-Type": "application/xml"}, b"<Error><Code>SlowDown</Code></Error>")
            if fault == "reset":
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                finally:
                    self.connection.close()
                return
            if fault == "stall":
                time.sleep(args.stall)
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            if fault == "lost_ack":
                return self.reply(500, {"Content-Type": "application/xml"}, b"<Error><Code>InternalError</Code></Error>")
            out = {k: v for k, v in resp.getheaders() if k.lower() not in HOP and k.lower() != "content-length"}
            self.reply(resp.status, out, data)

        def reply(self, status, headers, data):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True

    def stop(*_):
        print(f"fault proxy: {counts}", file=sys.stderr, flush=True)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
