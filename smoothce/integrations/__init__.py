"""Integrations with training frameworks, each in its own module, importing its framework lazily.

``smoothce.integrations.transformers``: ``patch(model)`` trains a Hugging Face causal LM on smoothce.
``import smoothce`` imports none of them.
"""
