"""The commands of ``precision``, one module per family; :mod:`precision.cli` groups them."""
