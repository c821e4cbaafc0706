"""Training scripts for the bundled checkpoints (CPU, seeded, resumable)."""
