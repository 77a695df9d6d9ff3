"""The pipeline through any Tinker endpoint (learner.backend = "tinker", explorer.sampler =
"tinker"): see backend.py."""
