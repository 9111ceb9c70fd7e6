"""APTModel: token embedding -> blocks -> final norm -> LM head, for the ``gpt`` backbone (attention + FFN
blocks, learned positions) and the ``mamba`` backbone (selective-scan blocks, no positions).

``model(input_ids, cache=None) -> logits``; ``model.new_cache(batch_size)`` returns a :class:`ModelCache` that
forward updates in place, so feeding a sequence in pieces (prefill, then one token at a time) gives the same
logits as one full forward. The cache holds values, not autograd graph (it is for decoding): with autograd on,
the gradients of one call's logits reach that call's tokens and the parameters, not the positions fed by earlier
calls (truncated backpropagation), so they differ from a full forward's; train on one full forward.
After each forward ``model.aux_losses`` holds that forward's auxiliary losses (``moe_balance``, ``moe_z``:
summed over MoE layers, already scaled) and ``model.hidden_states`` the final normalised hidden states
(``final``) and, when ``record_hidden`` is set, those after the middle block (``mid``).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from .layers import MoEWrappedFFN

logger = logging.getLogger(__name__)


def init_embeddings(embed: nn.Embedding, pos_embed: Optional[nn.Embedding], head: nn.Linear, std: float) -> None:
    """N(0, std) for the token and position tables and for an LM head not tied to the table (in that order: the
    builder's draws). One place for the model builder and APTModel.reset_parameters."""
    nn.init.normal_(embed.weight, std=std)
    if pos_embed is not None:
        nn.init.normal_(pos_embed.weight, std=std)
    if head.weight is not embed.weight:
        nn.init.normal_(head.weight, std=std)


def _tie_after_load(module: "APTModel", incompatible_keys: Any) -> None:
    module.tie_weights()  # load_state_dict(assign=True) put a tensor of its own in each module


class ModelCache:
    """Per-layer caches plus the number of positions already consumed."""

    def __init__(self, layers: list[Any], batch_size: int) -> None:
        self.layers = layers
        self.batch_size = batch_size
        self.pos = 0


class GPTBlock(nn.Module):
    def __init__(self, attn: nn.Module, ffn: nn.Module, norm1: nn.Module, norm2: nn.Module,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.ffn = norm1, attn, norm2, ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        a = self.attn(self.norm1(x), cache=cache)
        if isinstance(a, tuple):
            a = a[0]
        x = x + self.drop(a)
        return x + self.ffn(self.norm2(x))

    def new_cache(self, batch_size: int, max_len: Optional[int]) -> Any:
        return self.attn.new_cache(batch_size, max_len=max_len)


class MambaBlock(nn.Module):
    def __init__(self, mixer: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.mixer = norm, mixer

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), cache=cache)

    def new_cache(self, batch_size: int, max_len: Optional[int]) -> Any:
        return self.mixer.new_cache(batch_size)


class APTModel(nn.Module):
    def __init__(self, config: dict[str, Any], embed: nn.Embedding, blocks: list[nn.Module], norm_f: nn.Module,
                 head: nn.Linear, pos_embed: Optional[nn.Embedding] = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = config  # the full profile (model.vocab_size resolved)
        m = config["model"]
        self.backbone = m.get("backbone", "gpt")  # ModelBuilder's default: a "model" section without it is GPT
        self.vocab_size = int(m["vocab_size"])
        self.max_seq_len = int(m["max_seq_len"]) if self.backbone == "gpt" else None
        self.embed = embed
        self.pos_embed = pos_embed
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = norm_f
        self.head = head
        # tied embedding / LM head: one Parameter in two modules. .to_empty() (meta-device init) and
        # load_state_dict(assign=True) give each module its own tensor, which untied them silently (the two then
        # trained apart, the optimizer saw the table twice): they are tied again after both
        self.tie_embeddings = head.weight is embed.weight  # as built, not as a config says: one source of truth
        self.register_load_state_dict_post_hook(_tie_after_load)  # a function: the model stays picklable
        self.record_hidden = False
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.hidden_states: dict[str, torch.Tensor] = {}
        self._warned_no_grad = False

    def __getstate__(self) -> dict[str, Any]:
        # the last forward's aux losses and hidden states carry its graph: copy.deepcopy (an EMA copy mid-training)
        # refused them ("only graph leaves support the deepcopy protocol") and pickle stored them
        state = super().__getstate__()
        state["aux_losses"], state["hidden_states"] = {}, {}
        return state

    def tie_weights(self) -> None:
        """Make the LM head use the embedding table again if they were built tied; a no-op when already tied."""
        if self.tie_embeddings and self.head.weight is not self.embed.weight:
            self.head.weight = self.embed.weight

    def _apply(self, fn, *args, **kwargs):  # .to_empty() gives every module a new tensor: tie them again
        out = super()._apply(fn, *args, **kwargs)
        self.tie_weights()
        # model.attention_name / router_name "auto": choose for the new device now, outside any forward (a first
        # choice inside torch.compile(fullgraph=True) meets the registry's lock). Only ahead of time: a failure here
        # must not fail the move itself (the tensors are already moved); the choice is then made at first forward
        dev = self.embed.weight.device
        if dev.type != "meta":
            for chooser in getattr(self, "auto_choosers", ()):
                try:
                    chooser.warm_device(dev)
                except Exception as exc:  # third-party providers, devices without some dtype
                    logger.warning("apt model: the auto provider choice for %s could not be made ahead of use (%s: "
                                   "%s); it is made at the first forward (not traceable by torch.compile("
                                   "fullgraph=True))", dev, type(exc).__name__, exc)
        return out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every weight as the model builder does (e.g. after building on the meta device and
        ``.to_empty()``): each submodule's ``reset_parameters`` (children before their parents, so that a
        layer's own init of a child's tensor, e.g. Mamba's dt bias, is not overwritten), then the embeddings
        with ``model.init_std``."""
        for mod in reversed(list(self.modules())):
            if mod is not self and callable(getattr(mod, "reset_parameters", None)):
                mod.reset_parameters()
        self.tie_weights()
        init_embeddings(self.embed, self.pos_embed, self.head, float(self.config["model"].get("init_std", 0.02)))

    def moe_layers(self) -> list[MoEWrappedFFN]:
        return [m for m in self.modules() if isinstance(m, MoEWrappedFFN)]

    def new_cache(self, batch_size: int) -> ModelCache:
        return ModelCache([b.new_cache(batch_size, self.max_seq_len) for b in self.blocks], batch_size)

    def forward(self, input_ids: torch.Tensor, cache: Optional[ModelCache] = None) -> torch.Tensor:
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a (batch, time) tensor, got "
                             f"{tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__}")
        if input_ids.dtype not in (torch.long, torch.int32):
            raise TypeError(f"input_ids: expected int64 or int32 token ids, got {input_ids.dtype}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError(f"input_ids: no tokens (shape {tuple(input_ids.shape)})")
        if cache is not None and cache.batch_size != B:  # the Mamba state would broadcast silently
            raise ValueError(f"cache: made for batch size {cache.batch_size}, got input_ids with batch {B}")
        # on a GPU the check would cost a sync every decode step; under torch.compile it is data-dependent
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"input_ids: token ids must be in [0, {self.vocab_size}) (model.vocab_size), "
                                 f"got {lo if lo < 0 else hi}")
        # the previous forward's hidden states and aux losses carry its autograd graph (all its saved activations
        # when it had no backward: an eval loop without no_grad, a discarded forward): drop them before this
        # forward builds its own, so two graphs are never alive at once (peak memory was twice one forward's)
        self.hidden_states, self.aux_losses = {}, {}
        moe_layers = self.moe_layers()  # one module walk per forward, reused below
        for layer in moe_layers:
            layer.last_aux = {}
        x = self.embed(input_ids)
        past = cache.pos if cache is not None else 0
        if self.pos_embed is not None:
            if past + T > self.max_seq_len:
                raise ValueError(f"input_ids: positions {past}..{past + T - 1} exceed model.max_seq_len "
                                 f"({self.max_seq_len}); crop the context")
            x = x + self.pos_embed(torch.arange(past, past + T, device=input_ids.device))[None]
        x = self.drop(x)
        hidden: dict[str, torch.Tensor] = {}
        mid = len(self.blocks) // 2 - 1
        for i, block in enumerate(self.blocks):
            x = block(x, cache=cache.layers[i] if cache is not None else None)
            if self.record_hidden and i == max(mid, 0):
                hidden["mid"] = x
        x = self.norm_f(x)
        hidden["final"] = x
        self.hidden_states = hidden
        if cache is not None:
            cache.pos = past + T
        aux: dict[str, torch.Tensor] = {}
        for layer in moe_layers:
            for k, v in layer.last_aux.items():
                name = {"balance_loss": "moe_balance", "z_loss": "moe_z"}[k]
                aux[name] = aux[name] + v if name in aux else v
                if (self.training and not v.requires_grad and torch.is_grad_enabled() and not self._warned_no_grad
                        and any(p.requires_grad for p in layer.moe.parameters())):
                    # the block ran without autograd inside a forward with it: a reentrant checkpoint does that,
                    # and the losses kept aside (not in the block's output) come back from it with no graph
                    self._warned_no_grad = True
                    logger.warning("apt model: the MoE aux losses have no autograd graph (a block ran under "
                                   "no_grad, e.g. torch.utils.checkpoint(use_reentrant=True)): they will not train "
                                   "the router; checkpoint with use_reentrant=False")
        self.aux_losses = aux
        return self.head(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
