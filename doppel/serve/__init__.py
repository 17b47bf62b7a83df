"""Serving each person's production adapter: adapter resolution, prompts and engines.

The HTTP layer lives in `serving/api.py`; this package has no web framework in it.
"""
