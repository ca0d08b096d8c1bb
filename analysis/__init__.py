"""chinchax.analysis: load runs or published tables, fit scaling laws, plot and report."""
