"""The programs (`python -m experiments.NAME`): thin command-line wrappers over gpt/."""
