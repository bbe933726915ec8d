"""Training machinery behind ``effattn train`` / ``effattn eval`` (one job per module)."""
