"""Inference: sampling, generation (KV-cache, plugins), chat and perplexity evaluation."""
from .chat import ChatSession, run_chat
from .evaluate import EvalResult, evaluate_file, evaluate_text, perplexity
from .generate import Candidate, GenerationResult, generate, generate_tokens, rollouts
from .sampling import entropy, filter_logits, sample_next, top_k_filter, top_p_filter

__all__ = ["ChatSession", "run_chat", "EvalResult", "evaluate_file", "evaluate_text", "perplexity", "Candidate",
           "GenerationResult", "generate", "generate_tokens", "rollouts", "entropy", "filter_logits", "sample_next",
           "top_k_filter", "top_p_filter"]
