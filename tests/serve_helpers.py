"""What the serving tests share: adapters saved as `lorakit train` saves them, and uvicorn serving an app on
127.0.0.1 in a thread of the test process."""

import http.client
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.adapters.parts import saved_modules, task_heads
from lorakit.io import models
from lorakit.training.rundir import LABELS_FILE, write_json
from lorakit.training.tasks import TASKS

LABELS = {"news": ["World", "Sports", "Business"], "sentiment": ["negative", "positive"], "extra": ["a", "b", "c", "d"]}
TEXTS = ["striker scores in the league final", "shares fall as investors fret", "summit ends without a treaty"]


def train_like(model_dir, task, out, labels=None, seed=0, targets=("query", "value")):
    """An adapter saved as `lorakit train` saves one: random B and head, so that it changes the output."""
    net, _ = models.load_model(str(model_dir), TASKS[task], labels)
    config = lorakit.LoraConfig(r=4, alpha=8, targets=list(targets), init="random",
                                modules_to_save=task_heads(net, "SEQ_CLS") if task == "classify" else None)
    torch.manual_seed(seed)
    lorakit.inject(net, config)
    with torch.no_grad():
        for wrapper in saved_modules(net).values():
            for p in wrapper.modules_to_save["default"].parameters():
                p.normal_()
    lorakit.save_adapter(net, out)
    if labels:
        write_json(out / LABELS_FILE, labels)
    return out


class Server:
    """uvicorn serving `app` in a thread on a free port of 127.0.0.1."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def call(self, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None,
             timeout: float = 60) -> tuple[int, dict]:
        return call(self.url, method, path, body, raw, headers, timeout)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def call(url: str, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON answer) of one request to the server at `url`."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def send_big_body(port: int, size: int, chunked: bool) -> tuple[int, dict]:
    """POST /v1/classify with a `size`-byte body, declared (Content-Length) or chunked, the answer read while the
    body is still being sent: (status, JSON answer). A declared body is sent only in part: the answer must come
    without the rest. The server may close the connection before all is sent."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/v1/classify")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(size))
    conn.endheaders()
    piece = b"a" * 2**16

    def send() -> None:
        try:
            if not chunked:
                conn.send(b'{"adapter": "news", "texts": ["' + piece)
                return
            for _ in range(size // len(piece)):
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    response = conn.getresponse()
    answer = response.status, json.loads(response.read())
    conn.close()
    sender.join(timeout=30)
    return answer


def same_rows(got: list, want: list) -> bool:
    """Two run_batch results for one request: per text, the same labels in the same order, probabilities within 1e-5."""
    return len(got) == len(want) and all([l for l, _ in g] == [l for l, _ in w] and [p for _, p in g] ==
                                          pytest.approx([p for _, p in w], abs=1e-5) for g, w in zip(got, want))


def same_results(got: list, want: list) -> bool:
    return [r["label"] for r in got] == [r["label"] for r in want] and all(
        g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5) for g, w in zip(got, want))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log: Path, deadline: float) -> None:
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if call(url, "GET", "/health", timeout=2)[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("lorakit serve did not start within 120 s")


class Gated:
    """A tokenizer whose calls wait until `gate` is set (at most 30 s), saying when the first one started."""

    def __init__(self, tokenizer):
        self.tokenizer, self.entered, self.gate, self.longest = tokenizer, threading.Event(), threading.Event(), 0

    def __call__(self, text, **kwargs):
        self.entered.set()
        self.gate.wait(30)
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)
