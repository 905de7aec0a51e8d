"""Baselines of the paper's comparisons (issue 4, in progress): fine-tuning (full, top-k layers),
adapter-tuning and LoRA; each wrapper's ``parameters()`` are exactly the trainable weights."""
