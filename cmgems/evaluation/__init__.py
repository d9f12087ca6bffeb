"""Evaluation: finetuning, few-shot draws, task files, metrics, GUE, reports."""
