"""The training loop as the command line runs it, for `train` and `finetune` alike.

minilm.train.run yields one state per optimizer step; this wraps it with what a person at a terminal
needs: a progress bar, one JSON line of metrics per step in OUT/metrics.jsonl, a checkpoint every
checkpoint_every steps and at the end, and a clean stop on Ctrl-C that saves first (exit status 130).
A run that diverges (minilm.train.Diverged) stops at once: nothing more is saved, so the last
checkpoint, written while the run was still finite, is kept, and the message says how to resume.
Before any array is made, `check_size` (in closed form) and `check_memory` (product by product) refuse a
run the machine cannot hold.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from minilm.errors import MinilmError


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def refuse_beyond_memory(needed: int, what: str, fix: str) -> None:
    """Raise a MinilmError when `needed` bytes ("WHAT needs ... GiB ...") exceed the memory available now."""
    from minilm.contention import available_memory_bytes

    available = available_memory_bytes()
    if available is not None and needed > available:
        raise MinilmError(f"{what.format(gib=f'{needed / 2**30:,.1f}')}, but {available / 2**30:,.1f} GiB are "
                          f"available; {fix}")


def check_size(model_cfg, batch_size: int, what: str) -> None:
    """Refuse, in closed form and before anything is built, a model whose float32 parameters, gradients and
    AdamW moments alone exceed the memory available now. minilm.cost.step_cost (check_memory) is exact but
    lists every product of every layer, and initialising a model traces every layer: with --layers
    100000000 either would fill the memory before it could say so."""
    m = model_cfg
    params = m.layers * (4 * m.width ** 2 + 2 * m.width * m.mlp_width) + (m.vocab_size + m.context) * m.width
    activations = batch_size * m.context * m.layers * m.width  # one float per token, layer and unit
    refuse_beyond_memory(4 * (4 * params + activations),  # parameters, gradients, two moments; float32
                         what + " needs more than {gib} GiB for its parameters, gradients, optimizer state and "
                                "activations",
                         "choose a smaller --width, --layers, --mlp-ratio, --context or --batch-size")


def check_memory(cost, what: str) -> None:
    """Refuse a train step whose parameters, gradients, optimizer state and activations (a StepCost's
    memory_bytes, a lower bound) exceed the memory available now."""
    refuse_beyond_memory(cost.memory_bytes, what + " needs at least {gib} GiB for its parameters, gradients, "
                                                   "optimizer state and activations",
                         "choose a smaller --width, --layers, --context or --batch-size")


def fit(state, data, model_cfg, train_cfg, out: Path, save, *, resume: bool, saved: Path, resume_hint: str | None,
        sample_hint: str, loss=None, snapshot=None, snapshot_every: int = 0, layout=None) -> int:
    """Run training with a progress bar, log metrics.jsonl, save every checkpoint_every steps and on Ctrl-C.

    Args:
        state: the training state to start from (minilm.train.start, or a restored checkpoint's).
        save: save(state) writes what this run saves (a checkpoint, or an adapter) to `saved`.
        resume: continuing a saved run: metrics.jsonl keeps its lines up to the state's step.
        resume_hint, sample_hint: the commands printed for continuing the run and sampling from it.
        loss: the step's loss (default minilm.train.loss_fn; lora.loss_fn trains adapters).
        snapshot: snapshot(state) keeps what trains, called every `snapshot_every` steps and at the last.
        layout: a device mesh to train on (minilm/mesh.py), or None for one device. Over several processes
            only process 0 writes metrics.jsonl and prints; `save` and `snapshot` run on every process
            (gathering sharded arrays is a collective) and write on process 0 alone.
    Returns:
        the exit status: 0 when every step ran, 130 when Ctrl-C stopped the run (after saving).
    """
    from tqdm import tqdm

    from minilm import checkpoint, train
    from minilm.mesh import is_writer
    from minilm.tree import size

    writer = is_writer()
    metrics_path = out / "metrics.jsonl"
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume and metrics_path.exists():  # drop lines logged after the checkpoint we resume from
            kept = [line for line in metrics_path.read_text().splitlines() if logged_step(line) <= state.step]
        checkpoint.write_text_atomic(metrics_path, "".join(line + "\n" for line in kept))

    tokens_per_step = train_cfg.grad_accum * train_cfg.batch_size * model_cfg.context
    devices = "" if layout is None else f" on a mesh of {layout.devices} devices ({dict(layout.mesh.shape)})"
    if writer:
        print(f"training {size(state.trainable):,} parameters on {len(data.train):,} tokens "
              f"(vocabulary {data.tokenizer.size}){devices} -> {out}", file=sys.stderr)
    bar = tqdm(total=train_cfg.steps, initial=state.step, unit="step", desc="train", dynamic_ncols=True,
               disable=not writer)
    first_step, step_seconds, eval_loss = state.step, 0.0, float("nan")
    saved_step = state.step if resume else None
    stop = []

    def request_stop(*_):  # Ctrl-C: finish this step, save, exit. A second Ctrl-C interrupts at once.
        stop.append(True)
        signal.signal(signal.SIGINT, previous_handler)

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    try:
        with (metrics_path.open("a") if writer else open(os.devnull, "w")) as log:  # the others write nothing
            steps = train.run(state, data, model_cfg, train_cfg, loss or train.loss_fn, layout)
            for state, metrics in diverging_stops(steps, saved, lambda: saved_step, resume_hint, bar):
                if state.step > first_step + 1:  # the first step of a process includes compilation
                    step_seconds += metrics["step_seconds"]
                    metrics["tokens_per_s"] = tokens_per_step * (state.step - first_step - 1) / step_seconds
                eval_loss = metrics.get("eval_loss", eval_loss)
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", eval=f"{eval_loss:.3f}",
                                tok_s=f"{metrics.get('tokens_per_s', 0):,.0f}")
                bar.update(1)
                if snapshot and (state.step % snapshot_every == 0 or state.step == train_cfg.steps):
                    snapshot(state)
                if stop or state.step % train_cfg.checkpoint_every == 0 or state.step == train_cfg.steps:
                    save(state)
                    saved_step = state.step
                if stop:
                    bar.close()
                    hint = f"; continue with `{resume_hint}`" if resume_hint else ""
                    if writer:
                        print(f"\ninterrupted: saved step {state.step} to {saved}{hint}", file=sys.stderr)
                    return 130
    finally:  # a failed save (disk full) too: the bar ends its line, so the error is a line of its own
        bar.close()
        signal.signal(signal.SIGINT, previous_handler)
    if writer:
        print(f"done: step {state.step}, eval loss {eval_loss:.4f}\n"
              f"  saved       {saved}\n  metrics     {metrics_path}\n"
              f"  sample with {sample_hint}")
    return 0


def diverging_stops(steps, saved: Path, saved_step, resume_hint: str | None, bar):
    """train.run's steps; a Diverged becomes a MinilmError that also says what is kept and how to go on."""
    from minilm.train import Diverged

    try:
        yield from steps
    except Diverged as e:
        bar.close()
        step = saved_step()
        if step is None:
            kept = "nothing was saved; start again with a lower --lr"
        else:
            kept = f"the checkpoint of step {step} in {saved} is kept and finite"
            if resume_hint:
                kept += f"; continue from it with `{resume_hint} --lr <lower>`"
        raise MinilmError(f"{e}. Stopped: {kept}") from None
