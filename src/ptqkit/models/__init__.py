"""Offline models and data: local HF loading, the bundled test models, MobileNetV2, corpora.

Nothing here imports transformers at import time.
"""
