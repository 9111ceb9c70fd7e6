"""Data: tokenizers (byte-level default, BPE), dataset loading and batching for the trainer."""
from .tokenizers import BPETokenizer, ByteTokenizer, get_tokenizer, tokenizer_from_state

__all__ = ["BPETokenizer", "ByteTokenizer", "get_tokenizer", "tokenizer_from_state"]
