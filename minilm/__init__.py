"""minilm: a textbook GPT in JAX, to see what fine-tuning changes. Start with README.md.

The axis vocabulary, declared here once. Every shape comment, einsum string and axis name in the
project uses these letters, each with this one meaning (docs/DESIGN.md says why the layout is so):

    B  batch: sequences side by side (in an analysis, the probe's context windows)
    T  query positions: the tokens of one sequence
    S  key positions: T for a whole sequence; the cache's slots when generating
    D  model width (the residual stream)
    H  attention heads
    K  head size, D / H
    F  MLP width, mlp_ratio · D (4 D by default) or ModelConfig.mlp_units
    V  vocabulary
    L  layers (blocks)
    R  LoRA rank
    N  rows of flattened activations: N = B·T tokens, the (N, D) layout between blocks

Letters that only some files need, each also with one meaning:

    A  micro-batches stacked on a leading axis: accumulated into one step, or averaged in evaluation
    P  prompt tokens, G generated tokens (generate.py)
    Q  singular values of one (d_in, d_out) matrix: Q = min(d_in, d_out) (analysis/weights.py)
    M  points: vectors compared with one another, e.g. the probe words (analysis/geometry.py)
    C  clusters: labelled groups of points

A weight matrix's own sides are d_in and d_out, in the model's `x @ W` layout: W is (d_in, d_out).
"""
