"""Evaluation: recommendation benchmark format, Pass@K / Recall@K and other metrics, CoT indicators."""
