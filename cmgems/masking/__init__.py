"""Masking: which tokens a step masks (the maskings) and which masking each step uses (the curricula)."""
