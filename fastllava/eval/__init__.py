"""Evaluation on LLaVA-1.5's benchmarks: tasks (tasks/), LLaVA's scorers (scorers.py), the CLI (run.py)."""
