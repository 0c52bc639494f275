"""lorafleet's training engine: many LoRA adapters trained in one batched pass over a frozen base."""
