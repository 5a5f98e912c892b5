"""relaytune: a reproducible DVC pipeline to synthesise, audit, fine-tune and evaluate open LLMs."""

__version__ = "0.1.0"
