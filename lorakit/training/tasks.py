"""The tasks a run can train, one record each: everything that differs between a classifier and a causal LM is a
field here, said once, and the rest of lorakit asks the record (`task.labelled`, `task.auto_class`, ...) instead of
comparing names. A new task is one new record in TASKS (and the functions its fields name).

Lower wings (io, data) receive the record, or the field they need, as an argument; they never import this table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..adapters.config import LoraConfig
from ..data.tables import label_collator, token_collator
from ..errors import ConfigError
from .fit import examples, target_tokens
from .preference.objectives import OBJECTIVES


@dataclass(frozen=True)
class Task:
    """One kind of model a run trains."""

    name: str  # the --task value, and what metrics.json and train_config.yaml say
    peft_type: str  # PEFT's task_type in adapter_config.json
    auto_class: str  # the transformers auto class that loads the model
    architectures: tuple[str, ...]  # model class-name endings of this task (to tell a model without an adapter)
    labelled: bool  # examples carry a class label, the head is sized for the label set (labels.json)
    generates: bool  # a language model: the loss covers tokens; predict, chat and /v1/generate produce text
    metric: str  # the eval metric of the plot, the summary and --keep-best
    count: Callable[[dict], int]  # what a step's loss is a mean over (fit.Loop.count)
    collator: Callable  # tokenizer -> the batch builder of its examples
    endpoint: str  # the server's route for it
    preference: bool = False  # tuned on preferences (preference/run.py's hooks: its data, loss, reference, eval)
    plotted: str | None = None  # the eval metric of training.png when it is not `metric`


CLASSIFY = Task(name="classify", peft_type="SEQ_CLS", auto_class="AutoModelForSequenceClassification",
                architectures=("ForSequenceClassification",), labelled=True, generates=False, metric="accuracy",
                count=examples, collator=label_collator, endpoint="/v1/classify")
CAUSAL_LM = Task(name="causal-lm", peft_type="CAUSAL_LM", auto_class="AutoModelForCausalLM",
                 architectures=("ForCausalLM", "LMHeadModel"), labelled=False, generates=True, metric="loss",
                 count=target_tokens, collator=token_collator, endpoint="/v1/generate")


def _preference(objective) -> Task:
    # A language model tuned on preferences (preference/objectives.py names them): loaded and saved as a causal LM,
    # selected on eval loss. Unpaired rows (KTO) have no reward accuracy: their margin is plotted instead.
    return Task(name=objective.name, peft_type=CAUSAL_LM.peft_type, auto_class=CAUSAL_LM.auto_class,
                architectures=(), labelled=False, generates=True, metric="loss", count=objective.count,
                collator=token_collator, endpoint=CAUSAL_LM.endpoint, preference=True,
                plotted="rewards/accuracies" if objective.paired else "rewards/margins")


TASKS = {task.name: task for task in (CLASSIFY, CAUSAL_LM, *map(_preference, OBJECTIVES.values()))}
DEFAULT = CLASSIFY


def task_named(name: str) -> Task:
    """The record of --task `name`; ConfigError naming the tasks there are."""
    if name not in TASKS:
        raise ConfigError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]


def task_of(model_path: str, adapter: LoraConfig | None, name: str | None) -> Task:
    """The task of eval, predict, merge and serve: `name` if given, else the PEFT task_type of the adapter's config,
    else the model's architecture."""
    if name:
        return task_named(name)
    peft_type = adapter.task_type if adapter else None
    for task in TASKS.values():
        if task.peft_type == peft_type:
            return task
    from transformers import AutoConfig

    for arch in AutoConfig.from_pretrained(model_path).architectures or []:
        for task in TASKS.values():
            if arch.endswith(task.architectures):
                return task
    raise ConfigError(f"cannot tell the task of {model_path}; pass --task ({' or '.join(TASKS)})")
