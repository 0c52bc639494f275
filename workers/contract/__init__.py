"""The plain contract the engine accepts and emits: configs, the pack plan, events, and the memory model.
No torch, no pyarrow: the control plane imports this and nothing else of `workers` to decide."""
