"""Preference tuning of a LoRA (or QLoRA) adapter: DPO, IPO, ORPO and KTO, with no second model.

The reference policy of DPO, IPO and KTO is the model itself with its adapter switched off
(`lorakit.disable_adapters`), or, starting from a supervised adapter (`--ref-adapter`), a frozen copy of that adapter
held beside the trainable one on the same base: one base model in memory either way.

    data.py        rows of prompt/chosen/rejected (strings, or TRL's conversational format rendered with the chat
                   template) and KTO's prompt/completion/label, checked and tokenised; batches (chosen rows, then
                   rejected rows, in one tensor)
    losses.py      the objectives' formulas, each a small function of per-sequence log-probabilities
    logps.py       per-sequence completion log-probabilities; the reference's (adapter off, or the frozen adapter),
                   optionally precomputed once before training
    objectives.py  the task table (dpo, ipo, orpo, kto): what each reads, whether it needs a reference, and the
                   hook fit() calls for a batch's loss and metrics; evaluation
    run.py         what `lorakit train --task dpo|ipo|orpo|kto` adds to a run: settings checks, data, the reference

The numbers are TRL's (checked in tests/test_preference.py against trl's DPOTrainer, KTOTrainer and ORPOTrainer).
"""

from .losses import cdpo_loss, ipo_loss, kto_loss, orpo_loss, sigmoid_dpo_loss
from .objectives import OBJECTIVES, PREFERENCE_TASKS, Objective

__all__ = ["OBJECTIVES", "PREFERENCE_TASKS", "Objective", "cdpo_loss", "sigmoid_dpo_loss", "ipo_loss", "orpo_loss",
           "kto_loss"]
