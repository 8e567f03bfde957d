"""Trace-driven discrete-event simulator of a GPU cluster serving many LLMs."""
