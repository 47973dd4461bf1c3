"""Generation: end-of-turn tokens from the chat template, batched = one by one (left padding), streaming = the
whole text, seeded sampling repeatable, bad settings refused."""

import pytest
import torch
from chat_tokenizers import CHATML, LLAMA2, chat_tokenizer
from torch import nn

from lorakit.serving.generation import Sampling, end_of_turn_ids, generate, prompt_text, stream


def _model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab)).eval()


def test_end_of_turn_tokens_come_from_the_template():
    chatml = chat_tokenizer(CHATML)
    assert end_of_turn_ids(chatml) == sorted({chatml.eos_token_id, chatml.convert_tokens_to_ids("<|im_end|>")})
    llama2 = chat_tokenizer(LLAMA2)
    assert end_of_turn_ids(llama2) == [llama2.eos_token_id]  # Llama-2 closes answers with EOS itself
    assert end_of_turn_ids(chat_tokenizer(None)) == [chatml.eos_token_id]


def test_prompt_text_opens_the_assistant_turn():
    tok = chat_tokenizer(CHATML)
    assert prompt_text(tok, "hello", chat=True) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"},
               {"role": "user", "content": "what"}]
    assert prompt_text(tok, history, chat=True).endswith("<|im_start|>user\nwhat<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_text(tok, "hello", chat=False) == "hello"


def test_generation_stops_at_the_end_of_turn_token():
    tok = chat_tokenizer(CHATML)
    model = _model(len(tok))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # A head that always says "<|im_end|>": the answer is empty, one token long, not max_new_tokens.
    model.lm_head = nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[im_end] = 10.0
    assert generate(model, tok, ["hello"], Sampling(max_new_tokens=5), chat=True) == [""]
    enc = tok([prompt_text(tok, "hello", chat=True)], return_tensors="pt", add_special_tokens=False)
    ids = model.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=end_of_turn_ids(tok),
                         pad_token_id=tok.pad_token_id)
    assert ids.shape[1] == enc["input_ids"].shape[1] + 1


def test_batched_equals_one_by_one_and_streaming_equals_whole():
    tok = chat_tokenizer(CHATML)
    model = _model(len(tok))
    prompts = ["hello there", "how are you fine thanks what is the topic", "sports"]
    greedy = Sampling(max_new_tokens=6)
    batched = generate(model, tok, prompts, greedy, chat=True, batch_size=3)
    single = [generate(model, tok, [p], greedy, chat=True)[0] for p in prompts]
    assert batched == single and any(batched)
    pieces = []
    whole = stream(model, tok, prompts[1], greedy, pieces.append, chat=True)
    assert whole == single[1] and "".join(pieces).strip() == whole.strip() and len(pieces) >= 1


def test_sampling_is_repeatable_with_a_seed_and_settings_are_checked():
    tok = chat_tokenizer(CHATML)
    model = _model(len(tok))
    hot = Sampling(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=3)
    first = generate(model, tok, ["hello", "world"], hot, chat=True)
    assert first == generate(model, tok, ["hello", "world"], hot, chat=True)
    others = {tuple(generate(model, tok, ["hello", "world"], Sampling(8, 1.5, 0.95, seed=s), chat=True))
              for s in range(4, 8)}
    assert len(others | {tuple(first)}) > 1  # sampling, not greedy
    for kwargs, message in [(dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
                            (dict(temperature=-1), "temperature must be >= 0"),
                            (dict(top_p=0), r"top_p must be in \(0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            Sampling(**kwargs)
