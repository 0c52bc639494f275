"""Many LoRA adapters in one batched pass over a frozen base: layers, kernels, layout, attention, head."""
