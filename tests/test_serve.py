"""`lorakit serve` over real HTTP on 127.0.0.1: the labels `lorakit predict` gives, bad input answered with JSON
errors while correct requests keep working, concurrent requests batched, adapters loaded, unloaded and evicted."""

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import LABELS, TEXTS, Server, train_like
from test_chat_cli import ANSWER, chat_run  # noqa: F401  (a fixture: a tiny Llama trained on conversations)
from typer.testing import CliRunner

import lorakit
from lorakit.cli.main import app as cli
from lorakit.errors import MemoryFull
from lorakit.serving.app import create_app
from lorakit.serving.cache import Settings, open_state, use


@pytest.fixture(scope="module")
def classify_dirs(bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    train_like(bert_dir, "classify", root / "pinned" / "news", LABELS["news"], seed=1)
    train_like(bert_dir, "classify", root / "dir" / "sentiment", LABELS["sentiment"], seed=2)
    train_like(bert_dir, "classify", root / "dir" / "extra", LABELS["extra"], seed=3)
    (root / "outside").mkdir()
    return root


@pytest.fixture(scope="module")
def server(bert_dir, classify_dirs):
    settings = Settings(model=str(bert_dir), adapters={"news": str(classify_dirs / "pinned" / "news")},
                        adapter_dir=str(classify_dirs / "dir"), max_texts=8, max_batch_tokens=512, max_wait_ms=20,
                        allow_adapter_management=True)
    running = Server(create_app(open_state(settings)))
    yield running
    running.stop()


def _predict(bert_dir, adapter_dir, texts) -> list[dict]:
    result = CliRunner().invoke(cli, ["predict", "--model", str(bert_dir), "--adapter", str(adapter_dir), "--json",
                                      *texts])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]


def test_classify_gives_the_labels_lorakit_predict_gives(server, bert_dir, classify_dirs):
    for name, directory in [("news", classify_dirs / "pinned" / "news"), ("sentiment", classify_dirs / "dir" / "sentiment")]:
        status, body = server.call("POST", "/v1/classify", {"adapter": name, "texts": TEXTS})
        assert status == 200, body
        expected = _predict(bert_dir, directory, TEXTS)
        for got, want in zip(body["results"], expected):
            assert got["label"] == want["label"]
            assert list(got["probabilities"]) == list(want["probabilities"])  # the adapter's own labels, ranked
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    assert {r["label"] for r in body["results"]} <= set(LABELS["sentiment"])


BAD = [  # (method, path, JSON body or raw bytes, status, words the message must hold)
    ("POST", "/v1/classify", {"adapter": "nope", "texts": ["x"]}, 404, "unknown adapter"),
    ("POST", "/v1/classify", {"adapter": "../pinned/news", "texts": ["x"]}, 400, "refused"),
    ("POST", "/v1/classify", {"adapter": "a/b", "texts": ["x"]}, 400, "refused"),
    ("POST", "/v1/classify", b'{"adapter": "news", "texts": [', 422, "invalid request"),
    ("POST", "/v1/classify", {"adapter": "news", "texts": "one string"}, 422, "texts"),
    ("POST", "/v1/classify", {"adapter": 3, "texts": ["x"]}, 422, "adapter"),
    ("POST", "/v1/classify", {"adapter": "news"}, 422, "texts"),
    ("POST", "/v1/classify", {"adapter": "news", "texts": ["x"] * 9}, 413, "--max-texts 8"),
    ("POST", "/v1/classify", {"adapter": "news", "texts": [" ".join(["stocks"] * 120)] * 5}, 413, "--max-batch-tokens 512"),
    ("POST", "/v1/generate", {"adapter": "news", "prompt": "hello"}, 400, "/v1/classify"),
    ("POST", "/v1/adapters", {"name": "x", "path": "../pinned/news"}, 400, "outside --adapter-dir"),
    ("POST", "/v1/adapters", {"name": "x", "path": "/etc"}, 400, "outside --adapter-dir"),
    ("POST", "/v1/adapters", {"name": "..", "path": "extra"}, 400, "refused"),
    ("POST", "/v1/adapters", {"name": "news", "path": "extra"}, 409, "already loaded"),
    ("DELETE", "/v1/adapters/nope", None, 404, "not loaded"),
    ("GET", "/v1/nothing", None, 404, "Not Found"),
]


def test_bad_input_is_a_json_error_and_the_server_keeps_serving(server):
    for method, path, body, status, words in BAD:
        raw = body if isinstance(body, bytes) else None
        got, answer = server.call(method, path, None if raw else body, raw)
        assert (got, words in answer.get("error", "")) == (status, True), (method, path, body, answer)
    status, body = server.call("POST", "/v1/classify", {"adapter": "news", "texts": TEXTS[:1]})
    assert status == 200 and body["results"][0]["label"] in LABELS["news"]
    assert server.call("GET", "/health")[1]["status"] == "ok"


def test_concurrent_requests_share_mixed_batches(server):
    requests = [("news" if i % 3 else "sentiment", TEXTS[: 1 + i % 3]) for i in range(18)]
    alone = {name: server.call("POST", "/v1/classify", {"adapter": name, "texts": TEXTS})[1]["results"]
             for name in ("news", "sentiment")}
    before = server.call("GET", "/health")[1]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: server.call("POST", "/v1/classify", {"adapter": r[0], "texts": r[1]}),
                                requests))
    for (name, texts), (status, body) in zip(requests, answers):
        assert status == 200, body
        for got, want in zip(body["results"], alone[name]):
            assert got["label"] == want["label"]
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    after = server.call("GET", "/health")[1]
    assert after["requests"] - before["requests"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests)  # some requests shared a forward


def test_adapters_load_list_unload_and_load_on_first_use(server):
    status, body = server.call("POST", "/v1/adapters", {"name": "other", "path": "extra"})
    assert status == 201 and body["labels"] == LABELS["extra"]
    listed = {a["name"]: a for a in server.call("GET", "/v1/adapters")[1]["adapters"]}
    assert listed["news"]["pinned"] and not listed["other"]["pinned"] and listed["other"]["bytes"] > 0
    assert server.call("POST", "/v1/classify", {"adapter": "other", "texts": TEXTS})[1]["results"][0]["label"] in "abcd"
    assert server.call("DELETE", "/v1/adapters/other") == (200, {"unloaded": "other"})
    assert server.call("POST", "/v1/classify", {"adapter": "other", "texts": TEXTS})[0] == 404  # forgotten
    status, body = server.call("POST", "/v1/classify", {"adapter": "extra", "texts": TEXTS})  # --adapter-dir/extra
    assert status == 200 and body["results"][0]["label"] in LABELS["extra"]
    assert "extra" in {a["name"] for a in server.call("GET", "/v1/adapters")[1]["adapters"]}
    request = urllib.request.urlopen(server.url + "/docs", timeout=10)
    assert request.status == 200 and b"swagger" in request.read().lower()
    assert "/v1/classify" in server.call("GET", "/openapi.json")[1]["paths"]


def test_least_recently_used_adapters_are_evicted_pinned_stay(bert_dir, classify_dirs):
    settings = Settings(model=str(bert_dir), adapters={"news": str(classify_dirs / "pinned" / "news")},
                        adapter_dir=str(classify_dirs / "dir"))
    state = open_state(settings)
    assert use(state, "sentiment") is None
    one = state.loaded["sentiment"].bytes
    state.settings.adapter_memory_mb = (state.loaded["news"].bytes + one * 1.9) / 2**20  # room for one more only
    assert use(state, "extra") is None
    assert list(state.loaded) == ["news", "extra"] and state.stats["evictions"] == 1
    assert use(state, "sentiment") is None and list(state.loaded) == ["news", "sentiment"]
    assert isinstance(use(state, "extra", keep=["sentiment"]), MemoryFull)  # both needed at once: only one fits
    assert "news" in state.loaded and sorted(lorakit.configs(state.model)) == sorted(state.loaded)


def test_generate_gives_the_generation_lorakit_predict_gives(gpt2_dir, tmp_path):
    adapter = train_like(gpt2_dir, "causal-lm", tmp_path / "qa", targets=("c_attn",))
    settings = Settings(model=str(gpt2_dir), adapters={"qa": str(adapter)})
    running = Server(create_app(open_state(settings)))
    try:
        status, body = running.call("POST", "/v1/generate", {"adapter": "qa", "prompt": "election summit",
                                                             "max_new_tokens": 8})
        assert status == 200, body
        result = CliRunner().invoke(cli, ["predict", "--model", str(gpt2_dir), "--adapter", str(adapter), "--json",
                                          "--max-new-tokens", "8", "election summit"])
        assert body["generation"] == json.loads(result.output.splitlines()[-1])["generation"]
        status, body = running.call("POST", "/v1/classify", {"adapter": "qa", "texts": ["x"]})
        assert status == 400 and "causal-lm adapter" in body["error"]
        status, body = running.call("POST", "/v1/generate", {"adapter": "qa", "prompt": "x", "max_new_tokens": 999})
        assert status == 413 and "--max-new-tokens 256" in body["error"]
        assert running.call("POST", "/v1/generate", {"adapter": "qa", "prompt": "summit", "max_new_tokens": 2})[0] == 200
    finally:
        running.stop()


def test_serve_command_checks_its_adapters_before_serving(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--adapter", "news"])
    assert result.exit_code == 1 and "expected NAME=DIR" in result.output
    result = CliRunner().invoke(cli, ["serve", "--model", "x", "--adapter", "../news=" + str(tmp_path)])
    assert result.exit_code == 1 and "refused" in result.output


def test_a_chat_adapter_answers_over_http_as_lorakit_predict_does(chat_run):  # noqa: F811 (the fixture)
    # The server generates through predict's code: the prompt put in the run's chat template as a user turn, the
    # answer stopped at the end of the assistant's turn (a plain-text prompt and EOS alone would run on).
    running = Server(create_app(open_state(Settings(adapters={"chat": str(chat_run)}))))
    try:
        for prompt in ("how are you?", "hello there"):
            status, body = running.call("POST", "/v1/generate", {"adapter": "chat", "prompt": prompt,
                                                                 "max_new_tokens": 24})
            assert status == 200, body
            result = CliRunner().invoke(cli, ["predict", "--adapter", str(chat_run), "--json", "--max-new-tokens", "24",
                                              prompt])
            assert result.exit_code == 0, result.output
            assert body["generation"] == json.loads(result.output.splitlines()[-1])["generation"]
        assert body["generation"].strip() == ANSWER  # the trained answer, and nothing after its end of turn
    finally:
        running.stop()


def test_the_end_of_turn_is_found_once_per_adapter_not_per_request(chat_run, monkeypatch):  # noqa: F811
    # Finding the token that ends an answer renders a probe conversation (generation.end_of_turn_ids): at load time.
    from lorakit.serving import generation

    renders, original = [], generation.chat_labels

    def counted(*args, **kwargs):
        renders.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "chat_labels", counted)
    state = open_state(Settings(adapters={"chat": str(chat_run)}))
    assert len(renders) == 1 + bool(state.tokenizer.chat_template)  # the adapter's, and the base model's own
    running = Server(create_app(state))
    try:
        for prompt in ("how are you?", "hello there", "hi"):
            status, body = running.call("POST", "/v1/generate", {"adapter": "chat", "prompt": prompt,
                                                                 "max_new_tokens": 4})
            assert status == 200, body
        status, body = running.call("POST", "/v1/chat/completions", {"model": "chat", "max_tokens": 4,
                                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200, body
    finally:
        running.stop()
    assert len(renders) == 1 + bool(state.tokenizer.chat_template)  # no request rendered it again


def test_max_length_past_the_model_positions_is_capped_at_start_saying_so(gpt2_dir, capsys):
    state = open_state(Settings(model=str(gpt2_dir), max_length=4096))
    assert state.settings.max_length == 128  # the tiny GPT-2's n_positions
    assert "--max-length 4096 is more than the model's 128 positions" in capsys.readouterr().err
    assert open_state(Settings(model=str(gpt2_dir), max_length=64)).settings.max_length == 64
