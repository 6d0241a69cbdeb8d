"""Comparing a base and a tuned model: weights, vector geometry, attention, logit lens."""
