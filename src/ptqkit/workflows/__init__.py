"""Tier 11: what the command line runs: run directories (`runs`) and where models come from
(`sources`)."""
