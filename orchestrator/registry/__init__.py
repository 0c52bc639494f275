"""After training: the promotion gate, MLflow's model registry, and export to PEFT or merged models."""
