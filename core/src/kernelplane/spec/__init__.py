"""Speculative decoding: exact verification of draft tokens."""
