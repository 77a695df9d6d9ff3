"""Environments: user-level code written against rlpipe.env, like the examples."""
