"""chinchax.sweeps: expand sweep specs into runs, launch them, resume, and own the CLI."""
