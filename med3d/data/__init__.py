"""Data side: demo datasets now; readers, checks, plans, cache and sampler build on it."""
