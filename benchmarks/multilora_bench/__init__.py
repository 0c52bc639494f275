"""The multi-LoRA benchmark's modules; `benchmarks/bench_multilora.py` is the entry point."""
