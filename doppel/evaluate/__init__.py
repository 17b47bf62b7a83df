"""Honest evaluation: the same validation tokens scored by the adapter, the base model and
the production adapter, plus style metrics on generated replies, and the promotion gate."""
