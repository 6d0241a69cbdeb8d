"""LoRA for minilm: low-rank adapters on any chosen weights, trained without differentiating the base.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685). Read
weight.py (the maths), then config.py (what to adapt), then adapter.py (attach, train, merge, save).
"""

from lora.adapter import (adapter_names, attach, disable, format_summary, load_adapter, lora_weights, loss_fn,
                          merge, save_adapter, sites, split, summary, tie, unmerge, with_dropout)
from lora.config import LoraConfig, parse_spec
from lora.weight import LoraWeight

__all__ = ["LoraConfig", "LoraWeight", "adapter_names", "attach", "disable", "format_summary", "load_adapter",
           "lora_weights", "loss_fn", "merge", "parse_spec", "save_adapter", "sites", "split", "summary", "tie",
           "unmerge", "with_dropout"]
