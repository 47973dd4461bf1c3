"""Chat data: formats recognised by their columns, every row checked (errors name the row), and assistant-only labels
checked token by token against segments written out by hand for three template styles."""

import pytest
from chat_tokenizers import CHATML, CHATML_SYSTEM, LLAMA2, chat_tokenizer

from lorakit.data import conversations as C
from lorakit.errors import DataError

TALK = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine thanks"},
        {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]


@pytest.mark.parametrize("columns, name", [
    (["messages"], "openai"), (["id", "conversations"], "sharegpt"), (["instruction", "input", "output"], "alpaca"),
    (["instruction", "output"], "alpaca"), (["instruction", "input"], None), (["prompt", "completion"], None),
    (["text"], None), (["messages", "conversations"], "openai")])
def test_format_is_recognised_by_columns(columns, name):
    fmt = C.detect_format(columns)
    assert (fmt.name if fmt else None) == name


def test_sharegpt_and_alpaca_rows_become_conversations():
    share = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "hello"}]}
    assert C.conversation(C.FORMAT_NAMES["sharegpt"], share, 1) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]
    alpaca = C.FORMAT_NAMES["alpaca"]
    assert C.conversation(alpaca, {"instruction": "Name the topic.", "input": "striker coach", "output": "sports"}, 1) \
        == [{"role": "user", "content": "Name the topic.\n\nstriker coach"}, {"role": "assistant", "content": "sports"}]
    for empty in ("", None, float("nan")):
        assert C.conversation(alpaca, {"instruction": "Say hi.", "input": empty, "output": "hi"}, 1)[0] == {
            "role": "user", "content": "Say hi."}


def test_openai_messages_drop_keys_that_arrow_filled_with_none():
    row = {"messages": [{"role": "user", "content": "hi", "name": None}, {"role": "assistant", "content": "yo",
                                                                          "name": "bot"}]}
    assert C.conversation(C.FORMAT_NAMES["openai"], row, 1) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "name": "bot"}]


@pytest.mark.parametrize("fmt, record, message", [
    ("openai", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
     "row 7: message 2 is not a role/content pair"),
    ("openai", {"messages": ["hi", "hello"]}, "row 7: message 1 is not a role/content pair"),
    ("openai", {"messages": "hi"}, "row 7: column 'messages' must hold a non-empty list"),
    ("openai", {"messages": []}, "row 7: column 'messages' must hold a non-empty list"),
    ("openai", {"messages": [{"role": "bot", "content": "hi"}]}, "row 7: message 1 has role 'bot'"),
    ("openai", {"messages": [{"role": "user", "content": "hi"}]}, "row 7: the conversation has no assistant message"),
    ("openai", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "row 7: message 2 is an empty assistant message"),
    ("openai", {"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "x"}]},
     "row 7: message 1 has content of type list"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}, {"from": "bard", "value": "x"}]},
     "row 7: message 2 is from 'bard'"),
    ("sharegpt", {"conversations": [{"role": "user", "content": "hi"}]}, "row 7: message 1 is not a from/value pair"),
    ("alpaca", {"instruction": "Say hi.", "input": None, "output": ""}, "row 7: output must be non-empty text"),
])
def test_bad_rows_are_refused_with_their_row_number(fmt, record, message):
    with pytest.raises(DataError, match=message):
        C.conversation(C.FORMAT_NAMES[fmt], record, 7)


def expected(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) written out by hand: each segment's tokens, labelled when its flag says so."""
    ids, labels = [], []
    for text, trained in segments:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [-100] * len(part)
    return ids, labels


# Each case: template, conversation, the rendering cut into (text, labelled?) segments by hand.
CASES = {
    "chatml": (CHATML, TALK, [
        ("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n", False), ("fine thanks<|im_end|>", True),
        ("\n<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n", False), ("fine<|im_end|>", True),
        ("\n", False)]),
    "chatml-default-system": (CHATML_SYSTEM, TALK[:2], [
        ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
         False), ("fine thanks<|im_end|>", True), ("\n", False)]),
    "chatml-own-system": (CHATML_SYSTEM, [{"role": "system", "content": "answer"}] + TALK[:2], [
        ("<|im_start|>system\nanswer<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
         False), ("fine thanks<|im_end|>", True), ("\n", False)]),
    # Llama-2: the answer's leading space is the template's, and it is part of the answer's first token.
    "llama2": (LLAMA2, [{"role": "system", "content": "be brief"}] + TALK, [
        ("<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhello there [/INST]", False), (" fine thanks </s>", True),
        ("<s>[INST] how are you [/INST]", False), (" fine </s>", True)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_labels_cover_assistant_text_and_end_of_turn_only(case):
    template, messages, segments = CASES[case]
    tok = chat_tokenizer(template)
    out = C.chat_labels(tok, messages, 1)
    ids, labels = expected(tok, segments)
    assert out["input_ids"] == ids, "the hand-cut segments must tokenise as the whole rendering does"
    assert out["labels"] == labels
    assert out["attention_mask"] == [1] * len(ids)
    assert tok.decode([i for i in labels if i != -100]).endswith(("<|im_end|>", "</s>"))


def test_a_template_that_adds_text_to_the_generation_prompt_still_finds_the_answer():
    # The generation prompt says "assistant\n" but a rendered turn "assistant:\n": the bare prefix is used instead.
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = chat_tokenizer(template)
    out = C.chat_labels(tok, TALK[:2], 1)
    ids, labels = expected(tok, [("<|im_start|>user:\nhello there<|im_end|><|im_start|>assistant:\n", False),
                                 ("fine thanks<|im_end|>", True)])
    assert (out["input_ids"], out["labels"]) == (ids, labels)


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>{{ m['content'] }}<|im_end|>{% endif %}"
     "{% endfor %}", "renders without the assistant's text"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", "no special token"),
    # The last message is rendered differently from the same message once another follows.
    ("{% for m in messages %}<|im_start|>{{ m['content'] }}{% if not loop.last %}<|im_end|>{% endif %}{% endfor %}"
     "</s>", "renders the messages .* differently once"),
])
def test_unusable_templates_are_refused_before_training(template, message):
    tok = chat_tokenizer(template)
    with pytest.raises(DataError, match=message):
        C.set_chat_template(tok)
    with pytest.raises(DataError, match=f"row 5: .*{message}"):
        C.chat_labels(tok, TALK, 5)


def test_template_errors_name_the_row():
    tok = chat_tokenizer(LLAMA2)
    with pytest.raises(DataError, match="row 9: the chat template failed: .*roles must alternate"):
        C.chat_labels(tok, [TALK[0], TALK[0], TALK[1]], 9)


def test_chat_template_from_a_file_or_a_clear_error(tmp_path):
    tok = chat_tokenizer(None)
    with pytest.raises(DataError, match="has no chat template; give one with --chat-template FILE"):
        C.set_chat_template(tok)
    with pytest.raises(DataError, match="chat template file not found"):
        C.set_chat_template(tok, tmp_path / "none.jinja")
    (tmp_path / "t.jinja").write_text(LLAMA2)
    C.set_chat_template(tok, tmp_path / "t.jinja")
    assert tok.chat_template == LLAMA2
    C.set_chat_template(chat_tokenizer(CHATML), tmp_path / "t.jinja")  # a file wins over the tokenizer's own
