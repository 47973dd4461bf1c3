"""What `lorakit serve` refuses and survives, over real HTTP on 127.0.0.1: oversize bodies answered 413 before they
are read, big texts tokenized from their heads off the event loop, an API key, adapter management off by default,
pinned adapters kept, a corrupt adapter failing its own requests alone, adapters that do not fit memory together
served in turn, generation checked against the model's positions, a cap on requests in progress, and clients that
went away not computed. Every test here stops by itself in seconds."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serve_helpers import (
    LABELS,
    TEXTS,
    Gated,
    Server,
    call,
    free_port,
    same_results,
    same_rows,
    send_big_body,
    train_like,
    wait_ready,
)
from typer.testing import CliRunner

from lorakit.adapters.files import WEIGHTS_NAME
from lorakit.cli.main import app as cli
from lorakit.errors import MemoryFull
from lorakit.serving.app import create_app
from lorakit.serving.batcher import Item, run_batch
from lorakit.serving.cache import Settings, open_state, unload, use
from lorakit.serving.limits import CHARS_PER_TOKEN, encode
from lorakit.training.tasks import CLASSIFY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dirs(bert_dir, tmp_path_factory):
    """pinned/news; under dir/: sentiment, extra, broken (its weights cut in half), linked (labels.json a link to a
    file outside), empty (no adapter files); outside/ beside dir/."""
    root = tmp_path_factory.mktemp("served")
    train_like(bert_dir, "classify", root / "pinned" / "news", LABELS["news"], seed=1)
    train_like(bert_dir, "classify", root / "dir" / "sentiment", LABELS["sentiment"], seed=2)
    train_like(bert_dir, "classify", root / "dir" / "extra", LABELS["extra"], seed=3)
    shutil.copytree(root / "dir" / "extra", root / "dir" / "broken")
    weights = root / "dir" / "broken" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "outside").mkdir()
    (root / "outside" / "secret.json").write_text(json.dumps(["p", "q", "r", "s"]))
    shutil.copytree(root / "dir" / "extra", root / "dir" / "linked")
    (root / "dir" / "linked" / "labels.json").unlink()
    (root / "dir" / "linked" / "labels.json").symlink_to(root / "outside" / "secret.json")
    (root / "dir" / "empty").mkdir()
    return root


def _settings(bert_dir, dirs, **limits) -> Settings:
    return Settings(model=str(bert_dir), adapters={"news": str(dirs / "pinned" / "news")},
                    adapter_dir=str(dirs / "dir"), max_texts=8, max_wait_ms=20, **limits)


@pytest.fixture
def serving(bert_dir, dirs):
    """A function starting a server with these limits; every server it started stops after the test."""
    started = []

    def start(**limits) -> Server:
        started.append(Server(create_app(open_state(_settings(bert_dir, dirs, **limits)))))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def _alone(server: Server, names) -> dict:
    return {name: server.call("POST", "/v1/classify", {"adapter": name, "texts": TEXTS})[1]["results"] for name in names}


# ---- the fault test: a real `lorakit serve` process ----

def test_corrupt_adapter_fails_only_its_own_requests_and_sigterm_stops_the_server(bert_dir, dirs, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(bert_dir), "--adapter",
                             f"news={dirs / 'pinned' / 'news'}", "--adapter-dir", str(dirs / "dir"), "--port",
                             str(port), "--max-wait-ms", "20"], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_ready(proc, url, log, time.time() + 120)
        alone = {n: call(url, "POST", "/v1/classify", {"adapter": n, "texts": TEXTS})[1]["results"]
                 for n in ("news", "sentiment")}
        names = ["news", "broken", "sentiment", "news", "broken", "news"] * 10
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda n: call(url, "POST", "/v1/classify", {"adapter": n, "texts": TEXTS}), names))
        for name, (status, body) in zip(names, answers):
            if name == "broken":
                assert status == 422 and "'broken' could not be loaded" in body["error"], body
                assert str(dirs) not in body["error"]  # no absolute server path
            else:
                assert status == 200 and same_results(body["results"], alone[name]), (name, body)
        status, body = call(url, "POST", "/v1/classify", {"adapter": "news", "texts": TEXTS})
        assert status == 200 and same_results(body["results"], alone["news"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
    assert code is not None, "lorakit serve did not exit within 30 s of SIGTERM"


# ---- request size, and tokenizing off the event loop ----

@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_20_mb_body_is_refused_413_while_health_answers(serving, chunked):
    server = serving()
    answers = {}
    sender = threading.Thread(target=lambda: answers.update(big=send_big_body(server.port, 20_000_000, chunked)))
    sender.start()
    health = server.call("GET", "/health", timeout=30)  # answered at all while the big body is in flight
    sender.join(timeout=60)
    status, body = answers["big"]
    assert status == 413 and "--max-body-bytes 2,000,000" in body["error"], body
    assert health[0] == 200 and health[1]["status"] == "ok"
    assert server.call("POST", "/v1/classify", {"adapter": "news", "texts": TEXTS[:1]})[0] == 200


def test_max_body_bytes_is_the_limit(serving):
    server = serving(max_body_bytes=1000)
    small = {"adapter": "news", "texts": ["x" * 800]}
    assert server.call("POST", "/v1/classify", small)[0] == 200
    status, body = server.call("POST", "/v1/classify", {"adapter": "news", "texts": ["x" * 1001]})
    assert status == 413 and "--max-body-bytes 1,000" in body["error"]


@contextlib.contextmanager
def held_in_the_tokenizer(bert_dir, dirs, **limits):
    """A server whose tokenizer holds a first /v1/classify request until `gate` is set: (server, gate, finish),
    finish() waiting for that request and giving its (status, body)."""
    state = open_state(_settings(bert_dir, dirs, **limits))
    state.tokenizer = gated = Gated(state.tokenizer)
    server, answer = Server(create_app(state)), {}
    client = threading.Thread(target=lambda: answer.update(
        r=server.call("POST", "/v1/classify", {"adapter": "news", "texts": TEXTS})))
    try:
        client.start()
        assert gated.entered.wait(10)  # the first request is in progress
        yield server, gated.gate, lambda: (client.join(timeout=30), answer["r"])[1]
    finally:
        gated.gate.set()
        server.stop()


def test_tokenizing_runs_off_the_event_loop_so_health_answers_meanwhile(bert_dir, dirs):
    with held_in_the_tokenizer(bert_dir, dirs) as (server, gate, finish):
        health = server.call("GET", "/health", timeout=10)  # while the tokenizer is busy with the request
        assert not gate.is_set() and health[0] == 200
        gate.set()
        assert finish()[0] == 200


def test_long_texts_are_tokenized_from_their_heads_with_the_tokens_of_the_whole(bert_dir):
    from transformers import AutoTokenizer

    tokenizer = Gated(AutoTokenizer.from_pretrained(bert_dir))
    tokenizer.gate.set()
    long_text = " ".join(TEXTS * 5_000)  # 500 kB
    assert encode(tokenizer, long_text, 128, truncate=True) == \
        tokenizer.tokenizer(long_text, truncation=True, max_length=128)["input_ids"]
    assert tokenizer.longest <= CHARS_PER_TOKEN * 128  # only the head was tokenized
    assert encode(tokenizer, long_text, 100, truncate=False) is None  # over the limit, known from the head alone
    assert tokenizer.longest <= CHARS_PER_TOKEN * 128
    spaces = " " * 10_000 + TEXTS[0]  # a head of spaces holds no token: the whole text decides
    assert encode(tokenizer, spaces, 8, truncate=True) == tokenizer.tokenizer(spaces, truncation=True,
                                                                               max_length=8)["input_ids"]
    short = TEXTS[1]
    assert encode(tokenizer, short, 64, truncate=False) == tokenizer.tokenizer(short)["input_ids"]


# ---- who may do what ----

def test_api_key_guards_every_route_but_health(serving):
    server = serving(api_key="s3cret")
    request = {"adapter": "news", "texts": TEXTS[:1]}
    for headers in [None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
        status, body = server.call("POST", "/v1/classify", request, headers=headers)
        assert status == 401 and "API key" in body["error"], (headers, body)
    for path in ("/v1/adapters", "/openapi.json"):
        assert server.call("GET", path)[0] == 401
    assert server.call("GET", "/health")[0] == 200
    assert server.call("POST", "/v1/classify", request, headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_api_key_comes_from_the_environment_too(monkeypatch):
    import lorakit.serving.app

    seen = {}
    monkeypatch.setattr(lorakit.serving.app, "run", lambda settings, host, port: seen.update(settings=settings))
    result = CliRunner().invoke(cli, ["serve", "--model", "m"], env={"LORAKIT_API_KEY": "from-env"})
    assert result.exit_code == 0, result.output
    assert seen["settings"].api_key == "from-env" and not seen["settings"].allow_adapter_management
    assert seen["settings"].max_body_bytes == 2_000_000


def test_adapter_management_is_off_unless_allowed_and_first_use_still_loads(serving):
    server = serving()
    assert server.call("POST", "/v1/adapters", {"name": "other", "path": "extra"})[0] == 403
    status, body = server.call("DELETE", "/v1/adapters/news")
    assert status == 403 and "--allow-adapter-management" in body["error"]
    status, body = server.call("POST", "/v1/classify", {"adapter": "extra", "texts": TEXTS})
    assert status == 200 and body["results"][0]["label"] in LABELS["extra"]


def test_pinned_adapters_cannot_be_deleted_and_racing_loads_of_one_name_get_409(serving):
    server = serving(allow_adapter_management=True)
    before = _alone(server, ["news"])["news"]
    status, body = server.call("DELETE", "/v1/adapters/news")
    assert status == 409 and "pinned" in body["error"]
    assert same_results(_alone(server, ["news"])["news"], before)
    assert {a["name"]: a["pinned"] for a in server.call("GET", "/v1/adapters")[1]["adapters"]}["news"]
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: server.call("POST", "/v1/adapters", {"name": "race", "path": "extra"})[0],
                                 range(6)))
    assert sorted(statuses) == [201] + [409] * 5


# ---- bad adapters and bad input: 4xx JSON, no server paths ----

def test_bad_adapters_and_bad_text_are_4xx_json_without_server_paths(serving, dirs):
    server = serving(allow_adapter_management=True)
    cases = [  # (method, path, JSON body or raw bytes, status, words the message must hold)
        ("POST", "/v1/classify", b'{"adapter": "news", "texts": ["\\ud800"]}', 422, "not valid Unicode"),
        ("POST", "/v1/adapters", {"name": "x", "path": "extra\u0000"}, 400, "refused"),
        ("POST", "/v1/classify", {"adapter": "broken", "texts": ["x"]}, 422, "'broken' could not be loaded"),
        ("POST", "/v1/adapters", {"name": "y", "path": "broken"}, 422, "could not be loaded"),
        ("POST", "/v1/classify", {"adapter": "linked", "texts": ["x"]}, 400, "labels.json links outside"),
        ("POST", "/v1/adapters", {"name": "z", "path": "empty"}, 404, "no adapter_config.json in empty"),
        ("POST", "/v1/adapters", {"name": "z", "path": "extra/labels.json"}, 404, "extra/labels.json is not an adapter"),
    ]
    for method, path, body, status, words in cases:
        raw = body if isinstance(body, bytes) else None
        got, answer = server.call(method, path, None if raw else body, raw)
        assert (got, words in answer.get("error", "")) == (status, True), (path, body, answer)
        assert str(dirs) not in answer["error"] and str(dirs.resolve()) not in answer["error"]
    health = server.call("GET", "/health")[1]
    assert "/" not in health["model"] and "linked" not in {a["name"] for a in server.call("GET", "/v1/adapters")[1][
        "adapters"]}
    assert server.call("POST", "/v1/classify", {"adapter": "news", "texts": TEXTS})[0] == 200


# ---- memory: adapters that do not fit together are served in turn ----

def test_adapters_that_fit_only_one_at_a_time_are_served_in_turn(bert_dir, dirs):
    state = open_state(_settings(bert_dir, dirs))
    ids = state.tokenizer(TEXTS)["input_ids"]
    for name in ("sentiment", "extra"):
        assert use(state, name) is None
    sizes = {name: state.loaded[name].bytes for name in ("sentiment", "extra")}
    for name in sizes:
        unload(state, name)
    state.settings.adapter_memory_mb = (state.loaded["news"].bytes + max(sizes.values()) * 1.5) / 2**20  # one more
    alone = {name: run_batch(state, [Item(CLASSIFY.endpoint, name, ids)])[0] for name in sizes}
    assert isinstance(use(state, "sentiment", keep=["extra"]), MemoryFull)  # indeed they do not fit together
    evictions = state.stats["evictions"]
    results = run_batch(state, [Item(CLASSIFY.endpoint, "sentiment", ids), Item(CLASSIFY.endpoint, "extra", ids),
                                Item(CLASSIFY.endpoint, "news", ids), Item(CLASSIFY.endpoint, "sentiment", ids[:1])])
    assert not any(isinstance(r, BaseException) for r in results), results
    assert same_rows(results[0], alone["sentiment"]) and same_rows(results[1], alone["extra"])
    assert same_rows(results[3], alone["sentiment"][:1])
    assert results[2][0][0][0] in LABELS["news"]
    assert state.stats["evictions"] > evictions  # they took turns


# ---- generation: the model's positions, finite sampling settings ----

def test_generate_checks_positions_and_sampling_before_batching(gpt2_dir, tmp_path):
    adapter = train_like(gpt2_dir, "causal-lm", tmp_path / "qa", targets=("c_attn",))
    server = Server(create_app(open_state(Settings(model=str(gpt2_dir), adapters={"qa": str(adapter)},
                                                   max_wait_ms=50))))
    try:
        too_long = {"adapter": "qa", "prompt": " ".join(["election summit"] * 60), "max_new_tokens": 60}
        good = {"adapter": "qa", "prompt": "election summit", "max_new_tokens": 4}
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: server.call("POST", "/v1/generate", b), [too_long, good, too_long, good]))
        for (status, body), sent in zip(answers, [too_long, good, too_long, good]):
            if sent is too_long:
                assert status == 422 and "128 positions" in body["error"], body
            else:
                assert status == 200 and isinstance(body["generation"], str), body
        bad = [b'{"adapter": "qa", "prompt": "x", "temperature": Infinity}',
               b'{"adapter": "qa", "prompt": "x", "temperature": NaN}',
               b'{"adapter": "qa", "prompt": "x", "temperature": -1}',
               b'{"adapter": "qa", "prompt": "x", "top_p": 0}', b'{"adapter": "qa", "prompt": "x", "top_p": 1.5}']
        for raw in bad:
            status, body = server.call("POST", "/v1/generate", raw=raw)
            assert status == 422 and ("temperature" in body["error"] or "top_p" in body["error"]), (raw, body)
        sampled = dict(good, temperature=0.7, top_p=0.5)
        assert server.call("POST", "/v1/generate", sampled)[0] == 200
    finally:
        server.stop()


# ---- load: a cap on requests in progress, and clients that left ----

def test_requests_past_max_concurrent_get_429_and_health_still_answers(bert_dir, dirs):
    with held_in_the_tokenizer(bert_dir, dirs, max_concurrent_requests=1) as (server, gate, finish):
        status, body = server.call("POST", "/v1/classify", {"adapter": "news", "texts": TEXTS})
        assert status == 429 and "--max-concurrent-requests 1" in body["error"]
        assert server.call("GET", "/health")[0] == 200
        gate.set()
        assert finish()[0] == 200
        assert server.call("POST", "/v1/classify", {"adapter": "news", "texts": TEXTS})[0] == 200


def test_a_request_whose_client_left_is_not_computed(bert_dir, dirs):
    state = open_state(_settings(bert_dir, dirs))
    forward, gate, entered, calls = state.model.forward, threading.Event(), threading.Event(), []

    def gated_forward(*args, **kwargs):
        calls.append(1)
        entered.set()
        gate.wait(30)
        return forward(*args, **kwargs)

    state.model.forward = gated_forward
    app = create_app(state)
    server = Server(app)
    try:
        first = threading.Thread(target=lambda: server.call("POST", "/v1/classify", {"adapter": "news", "texts": TEXTS}))
        first.start()
        assert entered.wait(10)  # the worker is busy with the first request
        body = json.dumps({"adapter": "news", "texts": TEXTS}).encode()
        leaving = socket.create_connection(("127.0.0.1", server.port))
        leaving.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 10
        while app.state.batcher.queue.qsize() == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert app.state.batcher.queue.qsize() == 1  # waiting behind the first
        leaving.close()
        time.sleep(0.5)  # the server sees the connection closed
        gate.set()
        first.join(timeout=30)
        deadline = time.time() + 10
        while state.stats["abandoned"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert state.stats["abandoned"] == 1 and len(calls) == 1
        assert server.call("POST", "/v1/classify", {"adapter": "news", "texts": TEXTS})[0] == 200
        assert len(calls) == 2
    finally:
        gate.set()
        server.stop()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_the_server_runs_on_the_gpu_when_there_is_one(bert_dir, dirs, monkeypatch):
    import torch

    import lorakit.serving.cache

    torch.backends.cuda.matmul.allow_tf32 = False
    state = open_state(_settings(bert_dir, dirs))
    assert next(state.model.parameters()).device.type == "cuda"
    ids = state.tokenizer(TEXTS)["input_ids"]
    batch = [Item(CLASSIFY.endpoint, "news", ids), Item(CLASSIFY.endpoint, "sentiment", ids)]
    on_gpu = run_batch(state, batch)
    assert next(p for n, p in state.model.named_parameters() if "lora_A" in n).device.type == "cuda"
    monkeypatch.setattr(lorakit.serving.cache, "default_device", lambda: torch.device("cpu"))
    on_cpu = run_batch(open_state(_settings(bert_dir, dirs)), batch)
    assert same_rows(on_gpu[0], on_cpu[0]) and same_rows(on_gpu[1], on_cpu[1])
