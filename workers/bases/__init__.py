"""Base models: real ones from GGUF files converted once, random-init ones from real configs."""
