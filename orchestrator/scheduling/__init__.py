"""Where queued adapters train next: a pure function from demands, workers and model shapes to placements."""
