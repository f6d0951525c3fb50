"""GPT-1's supervised fine-tuning: task transformations, classifier and objective, tasks, metrics."""
