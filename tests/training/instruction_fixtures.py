"""Shared by the instruction tests (loaded by path: under --import-mode=importlib sibling test
modules are not importable): a hand-made prepared directory and a scripted chat-completions
server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ITEMS = {
    # item: (title, categories)
    "i01": ("Turbo Kart Racer", ["Video Games", "PC", "Racing"]),
    "i02": ("Night Street Racer", ["Video Games", "PC", "Racing"]),
    "i03": ("Dragon Quest Saga", ["Video Games", "PC", "Role-Playing"]),
    "i04": ("Rally Racer Pro", ["Video Games", "Xbox", "Racing"]),
    "i05": ("Racing Wheel Deluxe", ["Video Games", "PC", "Accessories", "Steering Wheels"]),
    "i06": ("Puzzle Island", ["Video Games", "Switch", "Puzzle"]),
    "i07": ("Puzzle Tower", ["Video Games", "Switch", "Puzzle"]),
    "i08": ("Mind Maze", ["Video Games", "Switch", "Puzzle"]),
    "i09": ("Space Marine Tactics", ["Video Games", "PC", "Strategy"]),
    "i10": ("Galaxy Command", ["Video Games", "PC", "Strategy"]),
    "i11": ("Fleet Admiral", ["Video Games", "PC", "Strategy"]),
    "i12": ("Gaming Mouse Pro", ["Video Games", "PC", "Accessories", "Gaming Mice"]),
    "i13": ("Soccer Stars", ["Video Games", "Xbox", "Sports"]),
    "i14": ("Tennis Champ", ["Video Games", "Xbox", "Sports"]),
}
SEQUENCES = {
    # user: [(item, review)], oldest first; last = test, second to last = valid.
    "u1": [("i01", "I love fast racing games."), ("i02", None), ("i03", "Fun story."),
           ("i04", "Bought it for my son who loves rally cars."), ("i05", "Perfect for my racing setup at home.")],
    "u2": [("i06", None), ("i07", "Great puzzles for my daughter."), ("i08", None),
           ("i13", "A gift for my nephew, he plays every day.")],
    "u3": [("i09", "Deep strategy, I enjoy long campaigns."), ("i10", None), ("i11", None), ("i01", None),
           ("i02", "Wanted something quick between campaigns."), ("i12", "Needed a precise mouse for strategy games.")],
}
SEARCH_SPLITS = {**{f"i{n:02d}": "train" for n in range(1, 12)}, "i12": "valid", "i13": "test", "i14": "train"}
CANDIDATES = [
    # (user, split, target, stored candidate order)
    ("u1", "valid", "i04", ["i09", "i04", "i13", "i14"]),
    ("u1", "test", "i05", ["i06", "i10", "i14", "i05"]),
    ("u2", "valid", "i08", ["i08", "i01", "i12", "i10"]),
    ("u2", "test", "i13", ["i03", "i13", "i04", "i11"]),
    ("u3", "valid", "i02", ["i05", "i06", "i02", "i14"]),
    ("u3", "test", "i12", ["i13", "i07", "i03", "i12"]),
]
DAY = 86_400


def write_prepared(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    counts = Counter(item for seq in SEQUENCES.values() for item, _ in seq)
    pq.write_table(pa.table({
        "item_id": list(ITEMS), "title": [t for t, _ in ITEMS.values()],
        "categories": pa.array([c for _, c in ITEMS.values()], pa.list_(pa.string())),
        "brand": [None] * len(ITEMS), "description": [None] * len(ITEMS), "review_text": [None] * len(ITEMS),
        "n_interactions": pa.array([counts[i] for i in ITEMS], pa.int32()),
    }), directory / "items.parquet")
    rows = {k: [] for k in ("user_id", "item_id", "timestamp", "rating", "review_text", "summary", "position", "split")}
    for user, sequence in SEQUENCES.items():
        for position, (item, review) in enumerate(sequence):
            split = "test" if position == len(sequence) - 1 else "valid" if position == len(sequence) - 2 else "train"
            for key, value in (("user_id", user), ("item_id", item), ("timestamp", 1_600_000_000 + position * DAY),
                               ("rating", 5.0), ("review_text", review), ("summary", None), ("position", position),
                               ("split", split)):
                rows[key].append(value)
    pq.write_table(pa.table({**rows, "timestamp": pa.array(rows["timestamp"], pa.int64()),
                             "rating": pa.array(rows["rating"], pa.float32()),
                             "summary": pa.array(rows["summary"], pa.string()),
                             "position": pa.array(rows["position"], pa.int32())}), directory / "interactions.parquet")
    pq.write_table(pa.table({"item_id": list(SEARCH_SPLITS), "split": list(SEARCH_SPLITS.values())}),
                   directory / "search_splits.parquet")
    pq.write_table(pa.table({
        "user_id": [c[0] for c in CANDIDATES], "split": [c[1] for c in CANDIDATES],
        "target_item_id": [c[2] for c in CANDIDATES],
        "negative_ids": pa.array([[i for i in c[3] if i != c[2]] for c in CANDIDATES], pa.list_(pa.string())),
        "candidate_ids": pa.array([c[3] for c in CANDIDATES], pa.list_(pa.string())),
    }), directory / "candidates.parquet")
    (directory / "stats.json").write_text("{}")
    return directory



# The server shuts itself down after this long whatever happens, so no test can hang on it.
SERVER_LIFETIME_S = 30.0


class ScriptedChatServer:
    """Answers POST /v1/chat/completions. `script` is consumed one action per request; once it is
    empty every request succeeds. Actions: "ok", "500", ("429", retry_after), ("slow", seconds),
    "malformed", "no_content", "400", ("hold", seconds) (succeed after a pause), "empty" and
    "blank" (an empty / whitespace completion), ("trickle", seconds) (a valid answer whose body
    goes out one byte every `seconds`; `trickled` records how many body bytes were sent and of
    how many, once the client has gone or the body is out, and `trickle_done` is then set)."""

    def __init__(self, script=()):
        self.script = list(script)
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.request_times: list[float] = []
        self.trickled: list[tuple[int, int]] = []
        self.trickle_done = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.bodies.append(body)
                    server.request_times.append(time.monotonic())
                    action = server.script.pop(0) if server.script else "ok"
                try:
                    self._act(action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow answer, as it should
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status, payload: bytes, headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def _act(self, action, body):
                kind, arg = (action, None) if isinstance(action, str) else action
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                elif kind == "ok" or kind == "hold":
                    if kind == "hold":
                        time.sleep(arg)
                    prompt = body["messages"][-1]["content"]
                    answer = f"Answer to: {prompt[:40]}"
                    self._send(200, json.dumps({"id": "x", "object": "chat.completion",
                                                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                                             "finish_reason": "stop"}]}).encode())
                elif kind == "429":
                    self._send(429, b'{"error": "slow down"}', [("Retry-After", str(arg))])
                elif kind == "500":
                    self._send(500, b'{"error": "boom"}')
                elif kind == "400":
                    self._send(400, b'{"error": "bad request"}')
                elif kind in ("empty", "blank"):
                    content = "" if kind == "empty" else "  \n "
                    self._send(200, json.dumps({"choices": [{"message": {"content": content}}]}).encode())
                elif kind == "trickle":
                    self._trickle(arg, json.dumps({"choices": [{"message": {"content": "too late"}}]}).encode())
                elif kind == "slow":
                    time.sleep(arg)
                    self._send(200, b'{"choices": [{"message": {"content": "too late"}}]}')
                elif kind == "malformed":
                    self._send(200, b"<html>gateway hiccup</html>")
                elif kind == "no_content":
                    self._send(200, b'{"choices": []}')
                else:
                    raise AssertionError(f"unknown action {action!r}")

            def _trickle(self, interval, payload: bytes):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                sent = 0
                try:
                    for byte in payload:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        sent += 1
                        time.sleep(interval)
                finally:
                    server.trickled.append((sent, len(payload)))
                    server.trickle_done.set()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.deadline = threading.Timer(SERVER_LIFETIME_S, self.httpd.shutdown)
        self.deadline.daemon = True

    def __enter__(self):
        self.thread.start()
        self.deadline.start()
        return self

    def __exit__(self, *exc):
        self.deadline.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


