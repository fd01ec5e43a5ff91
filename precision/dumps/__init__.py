"""The dump format: writer, reader, directory dumps (shards) and external formats.

Numpy and safetensors only: never imports torch or transformers.
"""
