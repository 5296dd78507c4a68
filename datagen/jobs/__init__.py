"""Recurring generation jobs on DBOS: definitions (definition.py), their schedules in the store (schedules.py), the worker (worker.py)."""
