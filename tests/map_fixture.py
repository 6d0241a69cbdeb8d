"""A map of word vectors with planted moves, built without training (for test_projection and test_browser).

M = 13 words in three groups, D = 16, levels static and layers 0..2, two variants, steps 0, 5, 10, 15, 20:
"full" moves words w1 and w8 along fixed directions, farther at each step, at every level; "lora" moves them
half as far and leaves the static embedding alone (as LoRA here does).
"""

import numpy as np

from minilm.analysis import vector_map

WORDS = [f"w{i}" for i in range(13)]
GROUPS = {"concepts": WORDS[:5], "objects": WORDS[5:9], "agents": WORDS[9:12]}  # w12 in none
PAIRS, CONTROLS = [("w0", "w1"), ("w5", "w6")], [("w2", "w3")]
LEVELS = ["static", "layer 0", "layer 1", "layer 2"]
STEPS = (5, 10, 15, 20)
MOVED = (1, 8)


def planted_states(seed: int = 3):
    rng = np.random.default_rng(seed)
    base = {level: rng.normal(size=(len(WORDS), 16)) for level in LEVELS}
    direction = {level: rng.normal(size=(len(MOVED), 16)) * 1.5 for level in LEVELS}
    states = {}
    for variant, scale in (("full", 1.0), ("lora", 0.5)):
        states[variant] = {}
        for step in STEPS:
            states[variant][step] = {}
            for level in LEVELS:
                x = base[level].copy()
                if not (variant == "lora" and level == "static"):
                    x[list(MOVED)] += scale * step / STEPS[-1] * direction[level]
                states[variant][step][level] = x
    return base, states


def planted_map() -> dict:
    base, states = planted_states()
    return vector_map.build(WORDS, GROUPS, PAIRS, CONTROLS, base, states)


def write_map_page(out):
    """A report folder holding the planted map, as experiment 01 writes one -> (report.html, metrics)."""
    from minilm import report, report_map
    data = planted_map()
    metrics = {"map": data}
    page = report.write_page(out, "map", [("Summary", "<p>planted moves</p>"), ("The map", report_map.map_block(data)),
                                          (None, ("map", report_map.fig_map(data)))], metrics)
    return page, metrics
