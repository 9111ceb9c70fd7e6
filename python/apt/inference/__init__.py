"""Inference: sampling, generation (KV-cache, plugins), chat and perplexity evaluation."""
from .generate import Candidate, GenerationResult, generate, generate_tokens, rollouts
from .sampling import entropy, filter_logits, sample_next, top_k_filter, top_p_filter

__all__ = ["Candidate", "GenerationResult", "generate", "generate_tokens", "rollouts", "entropy", "filter_logits",
           "sample_next", "top_k_filter", "top_p_filter"]
