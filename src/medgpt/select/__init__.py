"""Eval-driven data selection: embeddings, recall, and a contamination guard."""
