"""Accuracy studies on the offline recipes: ``python -m scripts.studies.<name>`` from the repository root."""
