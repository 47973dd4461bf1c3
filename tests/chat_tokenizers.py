"""A small byte-level BPE tokenizer with chat special tokens, built in the test, and chat templates in the styles of
real models (ChatML, ChatML with a default system prompt as Qwen's, Llama-2's [INST])."""

import functools

SPECIALS = ["</s>", "<s>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["user assistant system hello there how are you fine thanks what is the topic sports news world",
          "[INST] [/INST] <<SYS>> <</SYS>> be brief answer question"]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen-style: a default system prompt when the conversation brings none.
CHATML_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nbe brief<|im_end|>\n{% endif %}"
                 + CHATML)
# Llama-2-style: the system prompt inside the first [INST], BOS before each user turn, EOS after each answer, no
# generation prompt, and an error when roles do not alternate.
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
          "{% set messages = messages[1:] %}{% else %}{% set system = false %}{% endif %}"
          "{% for m in messages %}"
          "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if m['role'] == 'user' %}"
          "{% if loop.first and system %}{% set text = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + m['content'] %}"
          "{% else %}{% set text = m['content'] %}{% endif %}"
          "{{ bos_token + '[INST] ' + text.strip() + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")


@functools.lru_cache(maxsize=1)
def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok.to_str()


def chat_tokenizer(template: str | None = CHATML):
    """A fresh fast tokenizer (EOS </s>, BOS <s>, ChatML markers as special tokens) with `template`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe()), eos_token="</s>", bos_token="<s>",
                                   pad_token="</s>", extra_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=template)
