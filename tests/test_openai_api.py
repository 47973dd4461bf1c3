"""OpenAI's API on `lorakit serve`, checked with OpenAI's own client (the `openai` package) against a real server on
127.0.0.1: two chat adapters trained here (a tiny Llama; one always answers "fine thanks", the other "world news")
answer as `lorakit predict` does, whole or streamed, alone or batched together; stop strings, max_tokens, usage,
the model list, and errors in OpenAI's shape with the statuses its client expects."""

import contextlib
import http.client
import json
import threading
import time

import openai
import pytest
import torch
from serve_helpers import Server
from test_chat_train import chats, write_jsonl
from typer.testing import CliRunner

from lorakit.cli.main import app as cli
from lorakit.serving.app import create_app
from lorakit.serving.cache import Settings, open_state
from lorakit.serving.openai_api import Answer

ANSWERS = {"fine": "fine thanks", "world": "world news"}
KEY = "sk-test-key"


def ok(*args) -> str:
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(chat_llama_dir, tmp_path_factory) -> dict:
    """Two chat adapters of the tiny Llama, 80 steps of `lorakit train` each at fp32."""
    root = tmp_path_factory.mktemp("openai-runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and immune to other processes' load
    try:
        for name, answer in ANSWERS.items():
            data = write_jsonl(root / f"{name}.jsonl", chats(8, answer))
            ok("train", "--model", chat_llama_dir, "--task", "causal-lm", "--data", data, "--max-steps", "80",
               "--lr", "1e-2", "--batch-size", "8", "--targets", "all-linear", "--dropout", "0", "--warmup", "0",
               "--scheduler", "constant", "--max-length", "48", "--precision", "fp32", "--output", root / name)
    finally:
        torch.set_num_threads(threads)
    return {name: root / name for name in ANSWERS}


@pytest.fixture(scope="module")
def server(runs):
    state = open_state(Settings(adapters={name: str(path) for name, path in runs.items()}, max_wait_ms=20,
                                max_body_bytes=20_000))
    app = create_app(state)
    running = Server(app)
    running.state, running.batcher = state, app.state.batcher
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def predict(run, prompt: str, max_new_tokens: int = 24) -> str:
    """What `lorakit predict` answers (greedy) to `prompt` with adapter `run`."""
    return json.loads(ok("predict", "--adapter", run, "--json", "--max-new-tokens", max_new_tokens,
                         prompt).splitlines()[-1])["generation"]


def ask(client, model: str, prompt: str, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, **kw)


def test_chat_completion_is_predicts_answer_with_the_tokenizers_counts(server, client, runs):
    tokenizer = server.state.tokenizer
    for name, run in runs.items():
        reply = ask(client, name, "how are you", max_tokens=24)
        assert reply.choices[0].message.content == predict(run, "how are you") == ANSWERS[name]
        assert (reply.object, reply.model, reply.choices[0].finish_reason) == ("chat.completion", name, "stop")
        assert reply.id.startswith("chatcmpl-") and reply.created > 0 and reply.choices[0].message.role == "assistant"
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "how are you"}], tokenize=False,
                                               add_generation_prompt=True)
        answer = tokenizer(ANSWERS[name], add_special_tokens=False)["input_ids"]
        assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert reply.usage.completion_tokens == len(answer) + 1  # and <|im_end|>, which ended it
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    parts = [{"type": "text", "text": "how are"}, {"type": "text", "text": " you"}]  # content as OpenAI's parts
    reply = client.chat.completions.create(model="world", messages=[{"role": "user", "content": parts}], temperature=0)
    assert reply.choices[0].message.content == ANSWERS["world"]


def test_a_stream_gives_the_same_text_in_order_then_the_finish_and_done(server, client):
    whole = ask(client, "world", "hello there")
    chunks = list(ask(client, "world", "hello there", stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id} and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content == ANSWERS["world"] and len(pieces) >= 2  # by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage: a last chunk of counts
    events = sse(server, "/v1/chat/completions", {"model": "world", "messages": [{"role": "user", "content": "hi"}],
                                                  "temperature": 0, "stream": True})
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in json.loads(e) for e in events[:-1])  # not asked for


def sse(server, path: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed answer, read to its end."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    raw = response.read().decode()
    conn.close()
    return [line.removeprefix("data: ") for line in raw.split("\n\n") if line]


def test_two_adapters_at_once_share_a_batch_and_each_answers_as_alone(server, client):
    prompts = ["hello there", "what is the topic", "sports news", "how are you"]
    requests = [(name, p) for p in prompts for name in ANSWERS]
    replies = {}

    def send(r):
        replies[r] = ask(client, *r, max_tokens=24)

    gate = Gate(server.state.model, at=1)
    try:
        first = threading.Thread(target=send, args=(("fine", "world news today"),))
        first.start()  # holds the worker in its first forward while the others queue
        assert gate.entered.wait(30)
        threads = [threading.Thread(target=send, args=(r,)) for r in requests]
        for t in threads:
            t.start()
        wait_until(lambda: server.batcher.queue.qsize() == len(requests))
        gate.open.set()
        for t in [first, *threads]:
            t.join(60)
    finally:
        gate.remove()
    for (name, prompt), reply in replies.items():
        assert reply.choices[0].message.content == ANSWERS[name], (name, prompt)
    assert len(replies) == len(requests) + 1
    # One forward per token of the first answer, then one per token of the longest other: all of them in one batch.
    longest = max(reply.usage.completion_tokens for r, reply in replies.items() if r in requests)
    assert gate.calls == replies["fine", "world news today"].usage.completion_tokens + longest


class Gate:
    """Holds the model's `at`-th forward (1: the first) until `open` is set; counts the forwards."""

    def __init__(self, model, at: int):
        self.entered, self.open, self.calls, self.timed_out = threading.Event(), threading.Event(), 0, False

        def hold(module, args, kwargs):
            self.calls += 1
            if self.calls == at:
                self.entered.set()
                self.timed_out = not self.open.wait(30)

        self.handle = model.register_forward_pre_hook(hold, with_kwargs=True)

    def remove(self):
        self.open.set()
        self.handle.remove()


def wait_until(condition, deadline: float = 30) -> None:
    end = time.time() + deadline
    while not condition():
        assert time.time() < end, "the server did not get there within 30 s"
        time.sleep(0.01)


def test_stop_strings_cut_before_them_and_max_tokens_ends_with_length(server, client, runs):
    reply = ask(client, "fine", "hello there", stop=[" thanks", "zzz"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("fine", "stop")
    streamed = list(ask(client, "fine", "hello there", stop=" thanks", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "fine"
    assert streamed[-1].choices[0].finish_reason == "stop"
    reply = ask(client, "fine", "hello there", max_tokens=1)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 1
    assert reply.choices[0].message.content == predict(runs["fine"], "hello there", max_new_tokens=1)
    assert reply.choices[0].message.content != ANSWERS["fine"]


def test_completions_continue_the_prompt_as_it_is(server, client, chat_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reply = client.completions.create(model=server.state.model_name, prompt="hello there how", max_tokens=6,
                                      temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(chat_llama_dir, dtype=torch.float32)
    enc = tokenizer("hello there how", return_tensors="pt")
    want = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    new = want[0, enc["input_ids"].shape[1]:]
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == tokenizer.decode(new, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == enc["input_ids"].shape[1] and reply.usage.completion_tokens == len(new)
    streamed = list(client.completions.create(model=server.state.model_name, prompt="hello there how", max_tokens=6,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    assert streamed[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    sampled = [client.completions.create(model="fine", prompt="hello", max_tokens=8, temperature=1.5, seed=7)
               for _ in range(2)]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text  # the same seed, the same text


def test_models_lists_the_base_and_the_adapters(server, client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == [server.state.model_name, "fine", "world"]
    assert {m.object for m in listed.data} == {"model"}
    assert client.models.retrieve("world").id == "world"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


BAD = [  # (request fields, the field OpenAI's param names)
    ({"temperature": -1}, "temperature"),
    ({"messages": []}, "messages"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ""}, "stop"),
    ({"max_tokens": 0}, "max_tokens"),
]


def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(server, client):
    for fields, param in BAD:
        request = {"model": "fine", "messages": [{"role": "user", "content": "hi"}], **fields}
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**request)
        error = caught.value.body
        assert caught.value.status_code == 400 and error["param"].startswith(param), (fields, error)
        assert error["type"] == "invalid_request_error" and param.split(".")[0] in error["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "gpt-4o", "hi")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        ask(client, "no_such_adapter", "hi")
    status, body = server.call("POST", "/v1/chat/completions", {"model": "fine", "messages": [
        {"role": "user", "content": "hi"}], "max_tokens": 999})
    assert status == 413 and body["error"]["code"] == "request_too_large" and "--max-new-tokens" in body["error"]["message"]
    status, body = server.call("POST", "/v1/completions", {"model": "fine", "prompt": "x" * 30_000})
    assert status == 413 and body["error"]["code"] == "request_too_large" and "--max-body-bytes" in body["error"]["message"]
    status, body = server.call("POST", "/v1/completions", {"model": "fine", "prompt": "x", "echo": True})
    assert status == 400 and body["error"]["param"] == "echo"
    status, body = server.call("POST", "/v1/generate", {"adapter": "fine", "prompt": "hi", "n": 2})
    assert status == 422 and isinstance(body["error"], str)  # the server's own routes keep their contract
    assert ask(client, "fine", "hi").choices[0].message.content == ANSWERS["fine"]


def test_a_wrong_key_and_too_many_requests_are_the_clients_errors(runs):
    state = open_state(Settings(adapters={"fine": str(runs["fine"])}, api_key=KEY, max_concurrent_requests=1))
    running = Server(create_app(state))
    try:
        wrong = openai.OpenAI(base_url=running.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.models.list()
        assert caught.value.body["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=running.url + "/v1", api_key=KEY, max_retries=0)
        assert ask(right, "fine", "hi").choices[0].message.content == ANSWERS["fine"]
        gate, held = Gate(state.model, at=1), {}
        try:
            first = threading.Thread(target=lambda: held.update(reply=ask(right, "fine", "hi")))
            first.start()
            assert gate.entered.wait(30)  # one request in progress: --max-concurrent-requests 1
            with pytest.raises(openai.RateLimitError) as caught:
                right.models.list()
            assert caught.value.body["code"] == "rate_limit_exceeded"
        finally:
            gate.remove()
            first.join(60)
        assert held["reply"].choices[0].message.content == ANSWERS["fine"]
    finally:
        running.stop()


def test_a_stream_sends_tokens_as_they_come_and_a_client_that_leaves_stops_it(server, client):
    base = server.state.model_name
    request = {"model": base, "prompt": "hello there how", "max_tokens": 40, "temperature": 0, "stream": True}
    with never_ending(server.state.model, server.state.tokenizer):
        whole = client.completions.create(**{**request, "stream": False})
        assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 40
        gate = Gate(server.state.model, at=12)
        stream_and_leave(server, request, gate, server.call("GET", "/health")[1])
    assert gate.calls == 12  # the row ended at the token after the client left, not at 40


@contextlib.contextmanager
def never_ending(model, tokenizer):
    """The output rows of the tokens that end an answer (EOS, <|im_end|>) set to 0 while inside: the random base model
    then runs to max_tokens whatever this CPU rounds, as no other logit of a random model is ever below 0 for all
    tokens."""
    head = model.get_output_embeddings().weight
    ends = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    saved = head[ends].clone()
    with torch.no_grad():
        head[ends] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            head[ends] = saved


def stream_and_leave(server, request: dict, gate, before: dict) -> None:
    """Read a stream's first text while `gate` holds a later forward, leave, then let the generation go on."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(request), {"Content-Type": "application/json"})
        response = conn.getresponse()
        line = response.readline()  # comes with the 12th forward held: text is sent as it is generated
        assert line.startswith(b"data: ") and json.loads(line[6:])["choices"][0]["text"]
        assert gate.entered.wait(30) and not gate.timed_out
        conn.close()  # the client leaves mid-answer, at its 12th token
        wait_until(lambda: server.call("GET", "/health")[1]["streams_left"] > before["streams_left"])
        gate.open.set()
        wait_until(lambda: server.call("GET", "/health")[1]["batches"] > before["batches"])
    finally:
        gate.remove()


def test_a_stream_whose_client_left_while_queued_is_never_computed(server, client):
    gate, held = Gate(server.state.model, at=1), {}
    before = server.call("GET", "/health")[1]
    try:
        first = threading.Thread(target=lambda: held.update(reply=ask(client, "fine", "hi", max_tokens=24)))
        first.start()
        assert gate.entered.wait(30)  # the worker is busy: the stream below waits in the queue
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": "world", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "stream": True}),
            {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert json.loads(response.readline()[6:])["choices"][0]["delta"]["role"] == "assistant"
        conn.close()
        wait_until(lambda: server.call("GET", "/health")[1]["streams_left"] > before["streams_left"])
        gate.open.set()
        first.join(60)
    finally:
        gate.remove()
    wait_until(lambda: server.call("GET", "/health")[1]["abandoned"] == before["abandoned"] + 1)
    after = server.call("GET", "/health")[1]
    assert after["requests"] == before["requests"] + 1  # the first request alone was computed
    assert gate.calls == held["reply"].usage.completion_tokens


def test_a_failure_mid_stream_is_an_error_event_and_the_server_keeps_serving(server, client):
    calls = []

    def fail_second_step(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a forward failed")

    handle = server.state.model.register_forward_pre_hook(fail_second_step, with_kwargs=True)
    try:
        events = sse(server, "/v1/chat/completions", {"model": "fine", "messages": [{"role": "user", "content": "hi"}],
                                                      "temperature": 0, "stream": True})
    finally:
        handle.remove()
    error = json.loads(events[-2])["error"]  # the status line went out with the first chunk: the error comes in-band
    assert (error["type"], events[-1]) == ("server_error", "[DONE]") and "a forward failed" in error["message"]
    assert ask(client, "fine", "hi").choices[0].message.content == ANSWERS["fine"]


def test_streamed_text_never_splits_a_character(server):
    tokenizer = server.state.tokenizer
    text = "héllo wörld ☃ fine"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the characters come in several byte tokens
    sent = []
    answer = Answer(lambda t: tokenizer.decode(t, skip_special_tokens=True), ("wörld!",), frozenset(), sent.append)
    for token in ids:
        assert answer(token) is False
    assert all("\ufffd" not in piece for piece in sent)
    assert "".join(sent) + answer.rest() == text and answer.finish == "length"
