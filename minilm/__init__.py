"""minilm: a textbook GPT in JAX, to see what fine-tuning changes. Start with README.md."""
