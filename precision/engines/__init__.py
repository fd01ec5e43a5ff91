"""Inference engines other than Hugging Face eager: one package per engine, each with the same
small surface (capture inside the engine, launch it for ``precision capture --engine``, line its
records up with a Hugging Face capture)."""
