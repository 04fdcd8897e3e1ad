"""Objectives: one file per task (loss, metrics, evaluation)."""
