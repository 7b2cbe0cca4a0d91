"""Human-readable outputs of a run: the self-contained HTML report."""
