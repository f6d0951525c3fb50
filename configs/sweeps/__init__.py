"""Sweep configs for `python -m experiments.sweep`; gpt/sweeps.py describes their fields."""
