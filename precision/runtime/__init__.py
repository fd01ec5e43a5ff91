"""The torch side: recording hooks, streaming writer, on-device statistics, model
loading, the device registry, distributed capture and dry-run planning.
"""
