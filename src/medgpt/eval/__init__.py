"""Evaluation: multiple-choice accuracy, generation metrics (BLEU/ROUGE-L), side-by-side comparison."""
