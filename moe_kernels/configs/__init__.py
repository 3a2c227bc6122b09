"""Tuned launch configurations, stored as JSON per device name (written on the GPU machine
by the tuning scripts in benchmarks/)."""
