"""Generative models built on genfast.nn."""
