"""The adapter tree across jobs: who started from whom."""
