"""Workflows that need both halves: scan a running model, isolate, suggest, consistency.
"""
