"""A chat model trained in the test (a tiny random Llama, 80 steps of `lorakit train` on 8 conversations whose
answer is always "fine thanks"), then used as a person would: `lorakit predict` puts prompts in the saved chat
template and stops at the end of the turn (batched, streamed, sampled), and `lorakit chat` in a pseudo-terminal
answers, keeps the conversation (/history), starts over (/reset) and leaves (/exit)."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch
from test_chat_train import chats, write_jsonl
from typer.testing import CliRunner

from lorakit.cli.main import app
from lorakit.serving.generation import Sampling, end_of_turn_ids, generate, prompt_text, use_chat_template
from lorakit.training.trained import load_trained

runner = CliRunner()
ANSWER = "fine thanks"


def ok(*args) -> str:
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def chat_run(chat_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-run")
    data = write_jsonl(root / "chats.jsonl", chats(8, ANSWER))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and immune to other processes' load
    try:
        ok("train", "--model", chat_llama_dir, "--task", "causal-lm", "--data", data, "--max-steps", "80",
           "--lr", "1e-2", "--batch-size", "8", "--targets", "all-linear", "--dropout", "0", "--warmup", "0",
           "--scheduler", "constant", "--max-length", "48", "--log-every", "20", "--output", root / "run")
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def test_generation_answers_in_the_template_and_stops_at_the_end_of_turn(chat_run):
    net, tokenizer, _, _ = load_trained(None, str(chat_run))
    assert use_chat_template(tokenizer, str(chat_run))
    enc = tokenizer([prompt_text(tokenizer, "hello there", chat=True)], return_tensors="pt", add_special_tokens=False)
    ids = net.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=end_of_turn_ids(tokenizer),
                       pad_token_id=tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    # The answer's tokens, then <|im_end|>: the trained end of the assistant's turn, long before 20 tokens.
    assert ids == tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert generate(net, tokenizer, ["hello there", "what is the topic today"], Sampling(max_new_tokens=20),
                    chat=True) == [ANSWER, ANSWER]


def test_predict_batched_streamed_and_sampled(chat_run):
    prompts = ["hello there", "what is the news", "sports"]
    results = [json.loads(line) for line in ok("predict", "--adapter", chat_run, "--json", "--batch-size", "2",
                                                 *prompts).splitlines()]
    assert results == [{"text": p, "generation": ANSWER} for p in prompts]
    assert ok("predict", "--adapter", chat_run, "--stream", *prompts) == f"{ANSWER}\n" * 3
    sampled = [ok("predict", "--adapter", chat_run, "--temperature", "1.5", "--top-p", "0.9", "--seed", "7",
                  "--max-new-tokens", "8", "--json", *prompts) for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same text
    refused = runner.invoke(app, ["predict", "--adapter", str(chat_run), "--stream", "--json", "hi"])
    assert refused.exit_code == 1 and "--stream prints text as it comes" in refused.output


class Terminal:
    """A program on a pseudo-terminal: type lines, read what it shows."""

    def __init__(self, args: list[str]):
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, close_fds=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        os.close(child)

    def read_until(self, text: str, timeout: float = 120.0) -> str:
        seen, deadline = b"", time.time() + timeout
        while not seen.endswith(text.encode()):
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.time()))
            assert ready, f"no {text!r} within {timeout} s; the screen shows: {seen.decode(errors='replace')!r}"
            seen += os.read(self.fd, 4096)
        return seen.decode().replace("\r\n", "\n")

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


def test_chat_in_a_terminal_keeps_the_conversation(chat_run):
    term = Terminal([sys.executable, "-m", "lorakit", "chat", "--adapter", str(chat_run)])
    try:
        assert "/history shows the conversation" in term.read_until("you> ")
        term.type("hello there")
        assert f"assistant> {ANSWER}\n" in term.read_until("you> ", timeout=30)
        term.type("what is the topic")
        assert f"assistant> {ANSWER}\n" in term.read_until("you> ", timeout=30)
        term.type("/history")  # one turn per line, as the conversation was shown
        assert (f"you> hello there\nassistant> {ANSWER}\nyou> what is the topic\nassistant> {ANSWER}\n"
                in term.read_until("you> ", timeout=30))
        term.type("/hisotry")  # a mistyped command is answered, never sent to the model
        shown = term.read_until("you> ", timeout=30)
        assert "unknown command '/hisotry'; commands: /reset (start over), /history" in shown and ANSWER not in shown
        term.type("/reset")
        assert "(conversation cleared)" in term.read_until("you> ", timeout=30)
        term.type("/history")
        assert "(no conversation yet)" in term.read_until("you> ", timeout=30)
        term.type("/exit")
        assert term.proc.wait(timeout=30) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.fd)


def _scripted(lines: list[str]):
    # chat_loop's `read` and `write`: the user's lines in turn, then end of input; what it shows, joined.
    pending, shown = list(lines), []
    def read(prompt: str) -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)
    return read, lambda *parts, **_: shown.append("".join(map(str, parts))), shown


def test_chat_drops_the_oldest_exchanges_past_max_length_and_keeps_the_system_prompt(chat_run):
    from lorakit.cli.chat import chat_loop

    net, tokenizer, _, _ = load_trained(None, str(chat_run))
    use_chat_template(tokenizer, str(chat_run))
    system = {"role": "system", "content": "be brief"}
    turns = [{"role": "user", "content": f"question number {i}"} for i in range(3)]

    def tokens(messages):
        return len(tokenizer(prompt_text(tokenizer, messages, chat=True), add_special_tokens=False)["input_ids"])

    answer = {"role": "assistant", "content": ANSWER}
    two_exchanges = tokens([system, turns[1], answer, turns[2]])  # fits; the three exchanges do not
    assert tokens([system, turns[0], answer, turns[1], answer, turns[2]]) > two_exchanges
    read, write, shown = _scripted([t["content"] for t in turns])
    history = chat_loop(net, tokenizer, Sampling(max_new_tokens=8), system="be brief", read=read, write=write,
                        max_length=two_exchanges)
    assert history == [system, turns[1], answer, turns[2], answer]
    assert "(the oldest 2 turns no longer fit --max-length" in "".join(shown)

    read, write, shown = _scripted(["hello there", "word " * 200])
    history = chat_loop(net, tokenizer, Sampling(max_new_tokens=8), read=read, write=write, max_length=60)
    assert history == [{"role": "user", "content": "hello there"}, answer]  # the long message was not sent
    assert "the model is given at most 60 (--max-length): not sent" in "".join(shown)


def test_chat_and_predict_check_the_model_positions_before_any_work(chat_run):
    # The tiny chat Llama has 128 positions.
    too_many = runner.invoke(app, ["chat", "--adapter", str(chat_run)], input="/exit\n")  # 256 new tokens by default
    assert too_many.exit_code == 0
    assert "--max-new-tokens 256 would fill the model's 128 positions: answers are kept to 64 tokens" in too_many.output
    capped = runner.invoke(app, ["chat", "--adapter", str(chat_run), "--max-length", "500", "--max-new-tokens", "28"],
                           input="/exit\n")
    assert capped.exit_code == 0 and "conversations are kept to 100 tokens" in capped.output
    long_prompt = runner.invoke(app, ["predict", "--adapter", str(chat_run), "--max-new-tokens", "20", "hi",
                                      "word " * 150])
    assert long_prompt.exit_code == 1
    assert "prompt 2 has" in long_prompt.output and "leave room for 108" in long_prompt.output
