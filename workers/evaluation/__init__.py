"""Judging adapters as users will: batched generation, scorers, and the built-in skills data."""
