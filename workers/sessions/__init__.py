"""Interactive training sessions (Tinker-style): many users' live LoRA adapters on one shared base, their
forward_backward calls batched into packed multi-adapter passes ("clock cycles"), each with its own
optimizer. Above the engine, training and evaluation rooms; serving and the control plane build on it."""
