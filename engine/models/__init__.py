"""Model implementations, their registry and the safetensors loader.

Importing this package does not import the implementations;
:func:`engine.models.registry.get_model_class` does on first use.
"""
