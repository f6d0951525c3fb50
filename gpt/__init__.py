"""gpt-jax: GPT-1 and GPT-2 in JAX/Flax, faithful to the papers, ablatable by flag."""
