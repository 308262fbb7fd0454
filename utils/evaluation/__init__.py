"""Evaluation: perplexity, multiple-choice log-likelihood and text metrics, shared by the ``eval/`` scripts
(and by quantize.py's before/after report)."""
