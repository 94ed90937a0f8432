"""Light-weight evaluation helpers: held-out perplexity and greedy generation."""

from auto_round.eval.perplexity import EvalError, generate_text, perplexity

__all__ = ["EvalError", "generate_text", "perplexity"]
