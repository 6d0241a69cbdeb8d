"""LoRA for minilm: low-rank adapters on any chosen weights, trained without differentiating the base.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685). Read in this
order: weight.py (the maths: W + s·A B as a matrix the model multiplies without knowing), config.py
(what to adapt), targets.py (which matrices that picks), attach.py (initialising adapters), stack.py
(adapters on adapters, and a shared A), train.py (training only the adapters), merge.py, files.py,
and cost.py (what a LoRA step costs, against full fine-tuning).

This package builds on minilm; minilm itself never imports it (only its command line does).
"""

from lora.attach import attach
from lora.config import LoraConfig, parse_spec
from lora.cost import adapter_ranks, lora_step_cost, train_step_case
from lora.files import load_adapter, save_adapter
from lora.merge import disable, merge, unmerge
from lora.stack import adapter_names, fill_shared_a, lora_weights
from lora.targets import sites
from lora.train import format_summary, loss_fn, split, summary, with_dropout
from lora.weight import LoraWeight

__all__ = ["LoraConfig", "LoraWeight", "adapter_names", "adapter_ranks", "attach", "disable", "fill_shared_a",
           "format_summary", "load_adapter", "lora_step_cost", "lora_weights", "loss_fn", "merge", "parse_spec",
           "save_adapter", "sites", "split", "summary", "train_step_case", "unmerge", "with_dropout"]
