"""Model checkpoints and builders."""
