"""The controller loop: pure decisions over a snapshot of the store, acted on through the pack runtime
(Ray, or simulated packs for tests and the fleet benchmark)."""
