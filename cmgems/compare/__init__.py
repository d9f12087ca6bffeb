"""Comparing curricula: pretrain each mode, finetune each export, report."""
