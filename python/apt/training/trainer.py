"""The training loop.

AdamW (weight decay on matrices only), linear warmup then cosine decay to ``lr * min_lr_ratio``, gradient
clipping, gradient accumulation (``training.grad_accum`` micro-batches per optimizer step), mixed precision on
CUDA only (bf16 autocast, or fp16 with a GradScaler), hook broadcasts to the enabled plugins (a failing hook
disables its plugin, training goes on), auxiliary losses (the model's MoE balance / z losses and whatever plugins
put in ``ctx.aux_losses`` from ``compute_loss``) added to the LM loss, checkpoints to ``<out_dir>/last.pt`` and
exact resume (model, optimizer, scheduler, scaler, step, position in the epoch, RNG), a progress bar (tqdm when
installed) with loss and tokens/s. A Ctrl-C saves a checkpoint that resumes exactly too: one arriving between
micro-batches rolls the step back to its start (RNG included), one arriving during the optimizer step is held until
the step is whole.

Loss reported per step = mean over its micro-batches of (LM cross-entropy + aux losses).
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from ..core import registry
from ..core.config import run_name_problem
from ..core.schedules import Schedules
from ..data.datasets import IGNORE_INDEX, TokenBatches, build_data
from ..modeling.compose import ModelBuilder
from ..plugins.base import HookContext, Plugin
from ..plugins.manager import PluginManager
from . import checkpoint as ckpt

logger = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"training.device: {name!r} is not a device ({exc})") from None
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, meta...: a RuntimeError / AssertionError deep in .to()
        raise ValueError(f"training.device: {name!r}: expected auto, cpu, cuda or cuda:N (apt runs on the CPU and "
                         "on CUDA devices only)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device: {name!r} requested but CUDA is not available")
    return dev


def amp_dtype(setting: Any, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``training.amp`` on ``device``; None = full precision. CPU never autocasts."""
    s = str(setting).lower()
    if device.type != "cuda" or s in ("off", "false"):
        if device.type != "cuda" and s in ("bf16", "fp16"):
            # asked for by name (auto is silent): the run is float32, which the user did not ask for
            logger.warning("training.amp: %s asked for, but the run on %s uses float32 (mixed precision is used on "
                           "CUDA only); set training.amp: auto or off to silence this", s, device)
        return None
    if s in ("auto", "true"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[s]


@contextlib.contextmanager
def _hold_ctrl_c() -> Any:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it as KeyboardInterrupt when the block ends,
    so an optimizer step (parameters, optimizer and scheduler state, step counter) is applied whole or not at all.
    Only where Python's own handler is installed, in the main thread: a handler set by the user stays in charge."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _changed_keys(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "",
                  stored_only: bool = False) -> list[str]:
    """``key: old -> new`` for each leaf that differs between two nested mappings; ``stored_only``: only the keys
    ``before`` has (a checkpoint from an older apt lacks keys added since, which are not changes)."""
    out: list[str] = []
    for key in sorted(set(before) if stored_only else set(before) | set(after), key=str):
        a, b = before.get(key), after.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _changed_keys(a, b, f"{prefix}{key}.", stored_only)
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based) of ``total``: linear warmup over the first
    ``warmup`` steps (``(step + 1) / (warmup + 1)``), the full LR at step ``warmup``, then a cosine that reaches
    ``min_ratio`` at the last step, ``total - 1``. (The cosine used to end at step ``total``, which never runs,
    and the peak was used twice.)"""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = total - 1 - warmup
    t = min((step - warmup) / span, 1.0) if span > 0 else 0.0
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def _check_schedule_reader(key: str, active: Sequence[Plugin]) -> None:
    """Warn about a parameter schedule that no enabled plugin reads (``Plugin.schedule_names``): one that another
    registered plugin reads (not enabled), or a typo of a declared name. An undeclared name passes: a plugin that
    declares nothing may read it."""
    if any(key in p.schedule_names for p in active):
        return
    readers: dict[str, str] = {}
    for info in registry.REGISTRY.list_providers("plugin"):
        for n in getattr(registry.REGISTRY.provider_class("plugin", info.name), "schedule_names", ()):
            readers.setdefault(n, info.name)
    if key in readers:
        logger.warning("schedules.%s: read by plugin %r, which is not enabled (plugins.enabled), so this has no "
                       "effect", key, readers[key])
        return
    close = difflib.get_close_matches(key, sorted(readers), n=1)
    if close:
        logger.warning("schedules.%s: no plugin reads a schedule of that name (did you mean %r, read by %r?); "
                       "it has no effect", key, close[0], readers[close[0]])


class Trainer:
    def __init__(self, cfg: Mapping[str, Any], model: Optional[torch.nn.Module] = None, tokenizer: Any = None,
                 data: Optional[TokenBatches] = None, val_data: Optional[TokenBatches] = None,
                 plugins: Optional[Sequence[Plugin]] = None, out_dir: Optional[str] = None) -> None:
        self.cfg = dict(cfg)
        t = self.cfg["training"]
        self.t = t
        self.seed = int(self.cfg.get("seed", 0))
        # both generators the checkpoint stores and restores (checkpoint.capture_rng): seeding only torch's left
        # Python's `random` (a plugin's draws) seeded from the OS, so two fresh runs with one seed differed
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        if data is None:
            tokenizer, data, val_data = build_data(self.cfg["data"], self.seed, tokenizer)
        elif tokenizer is None:
            from ..data.tokenizers import ByteTokenizer
            tokenizer = ByteTokenizer()
        self.tokenizer, self.data, self.val_data = tokenizer, data, val_data
        self.device = pick_device(str(t.get("device", "auto")))
        if model is None:
            model = ModelBuilder(self.cfg, vocab_size=tokenizer.vocab_size).build()
        self.model = model.to(self.device)
        # the model under a DDP / torch.compile wrapper: its attributes (config, aux_losses, hidden_states,
        # moe_layers) are not reachable through a DDP wrapper, so the MoE losses and the plugins' inputs vanished
        self.core_model = ckpt.unwrap_model(self.model)
        built = getattr(self.core_model, "config", None)
        if isinstance(built, Mapping) and isinstance(built.get("model"), Mapping):
            # the model section as built (model.vocab_size resolved), which checkpoints must describe; the rest of
            # the profile (plugins, schedules, name) stays the one passed in (the model's whole config replaced it)
            self.cfg = {**self.cfg, "model": dict(built["model"])}
        self.grad_accum = int(t.get("grad_accum", 1))
        spe = t.get("steps_per_epoch") or max(1, data.default_batches_per_epoch() // self.grad_accum)
        self.steps_per_epoch = int(spe)
        self.total_steps = int(t.get("max_steps") or int(t.get("max_epochs", 1)) * self.steps_per_epoch)
        self.max_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.optimizer = self._make_optimizer()
        warm, floor = int(t.get("warmup_steps", 0)), float(t.get("min_lr_ratio", 0.1))
        if warm >= self.total_steps:
            logger.warning("training.warmup_steps (%d) >= the run's %d steps: the LR never reaches training.lr "
                           "(it ends at %.0f%% of it) and never decays", warm, self.total_steps,
                           100 * lr_factor(self.total_steps - 1, warm, self.total_steps, floor))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warm, self.total_steps, floor))
        self.amp_dtype = amp_dtype(t.get("amp", "auto"), self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.schedules = Schedules(self.cfg.get("schedules") or {}, self.max_epochs, self.total_steps)
        self.plugins = PluginManager(plugins) if plugins is not None else PluginManager.from_config(self.cfg)
        active_names = {p.name for p in self.plugins.plugins}
        for key in self.schedules.section:
            plugin = key[len("enable_"):-len("_at_epoch")] if key.startswith("enable_") and key.endswith(
                "_at_epoch") else None
            if plugin and plugin not in active_names:
                logger.warning("schedules.%s: plugin %r is not enabled (plugins.enabled), so this has no effect",
                               key, plugin)
            elif plugin and self.schedules.enable_epoch(plugin) >= self.max_epochs:
                logger.warning("schedules.%s: %d, but the run has %d epoch(s) (0-based): plugin %r never switches "
                               "on", key, self.schedules.enable_epoch(plugin), self.max_epochs, plugin)
            elif not plugin:
                _check_schedule_reader(key, self.plugins.plugins)
        for p in self.plugins.plugins:
            for key in p.schedule_positive:
                low = self.schedules.lowest(key)
                if low is not None and not low > 0:
                    raise ValueError(f"schedules.{key}: reaches {low:g} during the run; plugin {p.name!r} needs it "
                                     "> 0 throughout")
        self.ctx = HookContext(trainer=self, model=self.core_model, config=self.cfg,
                               extra={"schedules": self.schedules})
        name = self.cfg.get("name") or "run"
        bad_name = run_name_problem(name) if not (out_dir or t.get("out_dir")) else None  # an unvalidated mapping
        if bad_name:
            raise ValueError(f"name: {bad_name}")
        self.out_dir = Path(out_dir or t.get("out_dir") or Path("apt_runs") / name)
        self.epoch = 0
        self.step = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.history: list[float] = []  # loss per optimizer step
        self.val_history: list[float] = []
        self.val_step: Optional[int] = None  # the step val_history[-1] was measured at (a summary's val may be old)
        self.tokens_seen = 0
        resume = t.get("resume")
        if resume:
            path = self.out_dir / ckpt.CHECKPOINT_NAME if resume == "auto" else Path(resume)
            # exists(), not is_file(): a directory or other non-file named last.pt is an error now, not a fresh
            # run that fails when it first saves (os.replace onto a directory) after a whole epoch
            if resume != "auto" or path.exists() or path.is_symlink():
                if resume == "auto" and not path.is_file():
                    raise ckpt.CheckpointError(f"{path}: --resume auto: this is not a checkpoint file (a directory "
                                               "or a broken link?); move it away to start a fresh run")
                self.load_checkpoint(path)
        # the generators as this run's seed (or its checkpoint) left them: the first fit() starts from them, so
        # whatever draws from the global RNG between here and fit() (another Trainer, a torch.rand) does not
        # change the run's dropout / noise draws
        self._rng_at_ready: Optional[dict[str, Any]] = ckpt.capture_rng()

    # ---- setup -------------------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay, seen = [], [], set()
        for _, p in self.model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            # matrices decay; vectors (norms, biases) and parameters marked _no_weight_decay (Mamba's A_log, a
            # matrix of per-channel rates whose decay would erase its initial spectrum) do not
            (decay if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) else no_decay).append(p)
        betas = tuple(self.t.get("betas", [0.9, 0.95]))
        kw: dict[str, Any] = {}
        if self.device.type == "cuda":
            kw["fused"] = True
        return torch.optim.AdamW([{"params": decay, "weight_decay": float(self.t.get("weight_decay", 0.0))},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=float(self.t["lr"]), betas=betas, **kw)  # type: ignore[arg-type]

    # ---- checkpoints ---------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / ckpt.CHECKPOINT_NAME

    def save_checkpoint(self, path: Optional[Path] = None, rng: Optional[Mapping[str, Any]] = None) -> Path:
        """Write the checkpoint; ``rng``: the generator states to store instead of the current ones."""
        state = {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                 "history": list(self.history), "val_history": list(self.val_history),
                 "val_step": self.val_step, "tokens_seen": self.tokens_seen}
        out = ckpt.save(path or self.checkpoint_path, self.model, self.cfg, self.tokenizer, self.optimizer,
                        self.scheduler, self.scaler, state, self.plugins.state_dict(),
                        rng=rng if rng is not None else True)
        logger.info("checkpoint saved: %s (epoch %d, step %d)", out, self.epoch, self.step)
        return out

    def load_checkpoint(self, path: Path) -> None:
        blob = ckpt.load(path, map_location="cpu")
        stored_tok = blob.get("tokenizer") or {"type": "byte"}
        if self.tokenizer is not None and dict(stored_tok) != self.tokenizer.state_dict():
            # same vocabulary size, other merges (the training text changed and a BPE was retrained on it): the
            # weights would go on learning ids that now mean other strings. Before the weights: another vocabulary
            # size failed there first, as a size mismatch blamed on model.d_model / num_layers
            was, now = stored_tok.get("type"), self.tokenizer.state_dict().get("type")
            what = ("its BPE merges differ from the checkpoint's (the text it is trained on changed?)"
                    if was == now else f"it is {now!r}, the checkpoint's is {was!r}")
            raise ckpt.CheckpointError(
                f"{path}: the tokenizer this profile builds does not match the run's: {what}; resume with the "
                "data.tokenizer / data.tokenizer_path / training text the run started with")
        try:
            # a checkpoint written before saves were unwrapped holds a DDP / torch.compile wrapper's keys
            self.core_model.load_state_dict(ckpt.strip_wrapper_prefixes(blob["model"], self.core_model))
        except RuntimeError as exc:  # missing / unexpected keys, size mismatches
            first = str(exc).strip().splitlines()
            detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
            if len(detail) > 300:  # a GPT profile resuming a Mamba run listed every one of its keys
                detail = detail[:300].rsplit(", ", 1)[0] + ", ..."
            was = ((blob.get("profile") or {}).get("model") or {}).get("backbone")
            now = (self.cfg.get("model") or {}).get("backbone")
            if was and now and was != now:
                detail = f"the checkpoint holds a {was!r} model, this profile builds a {now!r} one; {detail}"
            raise ckpt.CheckpointError(
                f"{path}: the checkpoint's model does not match the one this profile builds ({detail}); resume "
                "with the profile it was trained with (model.d_model, model.num_layers, ... as stored in it)"
            ) from None
        stored_model = (blob.get("profile") or {}).get("model") or {}
        changed = _changed_keys(stored_model, self.cfg.get("model") or {}, "model.")
        if changed:
            logger.warning("resuming %s with a model section that differs from the checkpoint's: %s", path,
                           "; ".join(changed[:8]))
        self._warn_changed_run_settings(path, blob.get("profile") or {})
        if "optimizer" in blob:
            try:
                self.optimizer.load_state_dict(blob["optimizer"])
            except (ValueError, KeyError) as exc:  # other parameters (model.tie_embeddings changed, ...)
                raise ckpt.CheckpointError(
                    f"{path}: the checkpoint's optimizer state does not fit this model's parameters ({exc}); "
                    "resume with the profile it was trained with") from None
            self._apply_profile_hyperparameters(path, blob)
        if "scheduler" in blob:
            self.scheduler.load_state_dict(blob["scheduler"])
            # training.lr and the schedule's length (max_epochs, max_steps) as the profile says now: the next step's
            # LR is the new schedule's at this step (the same float as the stored one when nothing changed)
            self.scheduler.base_lrs = [float(self.t["lr"])] * len(self.optimizer.param_groups)
            step = self.scheduler.last_epoch
            for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
                group["lr"] = base * fn(step)
        if self.scaler is not None and "scaler" in blob:
            self.scaler.load_state_dict(blob["scaler"])
        st = blob.get("trainer") or {}
        try:  # a tampered or foreign file: name the part, not int()'s or list()'s complaint
            self.epoch, self.step = int(st.get("epoch", 0)), int(st.get("step", 0))
            self.batch_in_epoch = int(st.get("batch_in_epoch", 0))
            self.history = list(st.get("history", []))
            self.val_history = list(st.get("val_history", []))
            val_step = st.get("val_step")  # absent from checkpoints written before it was stored
            self.val_step = int(val_step) if val_step is not None else None
            self.tokens_seen = int(st.get("tokens_seen", 0))
        except (TypeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"{path}: 'trainer' holds a bad value ({exc}); not a checkpoint apt "
                                       "wrote, or edited since?") from None
        if "plugins" in blob:
            self.plugins.load_state_dict(blob["plugins"])
        if "rng" in blob:
            try:
                ckpt.restore_rng(blob["rng"])
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ckpt.CheckpointError(f"{path}: 'rng' holds a bad generator state ({exc}); not a checkpoint "
                                           "apt wrote, or edited since?") from None
        logger.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    # training keys that change what the resumed steps compute (lr, betas, weight_decay and the run length have
    # warnings of their own, in _apply_profile_hyperparameters); out_dir, logging, eval, device do not
    _RUN_KEYS = ("steps_per_epoch", "warmup_steps", "min_lr_ratio", "grad_clip", "grad_accum", "amp")

    def _warn_changed_run_settings(self, path: Path, stored: Mapping[str, Any]) -> None:
        """The data, seed, schedule shape and plugins the run was trained with, against the profile's now: a change
        takes effect (the profile wins) but the resumed run is no longer the interrupted one, so it is said (a
        changed seed or batch size silently gave another data order)."""
        if not isinstance(stored, Mapping) or not stored:
            return

        def run_part(cfg: Mapping[str, Any]) -> dict[str, Any]:
            t = cfg.get("training") or {}
            return {"seed": cfg.get("seed"), "data": cfg.get("data") or {}, "plugins": cfg.get("plugins") or {},
                    "training": {k: t[k] for k in self._RUN_KEYS if k in t}}
        # the keys the checkpoint has only: one from an older apt lacks keys added since, which are not changes
        before = {k: v for k, v in run_part(stored).items() if k != "seed" or "seed" in stored}
        changed = _changed_keys(before, run_part(self.cfg), stored_only=True)
        if changed:
            more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
            logger.warning("resuming %s with settings that differ from the run's: %s%s; they take effect, so the "
                           "resumed run is not the one interrupted (data order, schedule)", path,
                           "; ".join(changed[:8]), more)

    def _apply_profile_hyperparameters(self, path: Path, blob: Mapping[str, Any]) -> None:
        """The optimizer state restores the hyperparameters it was saved with; the profile's (which the checkpoint
        records as the run's) win, and a change says so. Unchanged values are the same floats: exact resume."""
        lr, betas = float(self.t["lr"]), tuple(float(b) for b in self.t.get("betas", [0.9, 0.95]))
        wd = float(self.t.get("weight_decay", 0.0))
        old_t = ((blob.get("profile") or {}).get("training") or {})
        for key, now in (("lr", lr), ("betas", list(betas)), ("weight_decay", wd)):
            before = old_t.get(key)
            if before is not None and before != now and not (key == "lr" and float(before) == now):
                logger.warning("training.%s: %s in %s, %s now: the resumed run uses %s", key, before, path, now, now)
        for key in ("max_epochs", "max_steps"):  # the run length: the schedule (warmup, cosine) is the profile's now
            before, now = old_t.get(key), self.t.get(key)
            if key in old_t and before != now:
                logger.warning("training.%s: %s in %s, %s now: the resumed run's length and LR schedule follow %s",
                               key, before, path, now, now)
        for i, group in enumerate(self.optimizer.param_groups):
            group["initial_lr"] = lr
            group["betas"] = betas
            group["weight_decay"] = wd if i == 0 else 0.0

    # ---- loop --------------------------------------------------------------------------------------------
    def _optimizer_step(self, clip: Any, step_losses: list[torch.Tensor]) -> tuple[float, float, Optional[float]]:
        """Apply the accumulated gradients: unscale, clip, step, scheduler, counters, loss history. Returns (loss,
        the LR this step used, grad norm or None)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip)))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]  # before the scheduler moves on
        self.scheduler.step()
        self.step += 1
        loss = float(torch.stack(step_losses).float().mean())
        if not math.isfinite(loss) and self.scaler is None:
            raise FloatingPointError(
                f"training loss is {loss} at epoch {self.epoch}, step {self.step}; lower training.lr, "
                "keep training.grad_clip on, or check the data")
        self.history.append(loss)
        return loss, lr, grad_norm

    def _sync_ctx(self, **kw: Any) -> HookContext:
        c = self.ctx
        c.epoch, c.step = self.epoch, self.step
        for k, v in kw.items():
            setattr(c, k, v)
        return c

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ctx = self.ctx
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = self.model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            ctx.extra["logits"], ctx.extra["targets"] = logits, y
            self.plugins.broadcast("compute_loss", ctx)
        aux: dict[str, torch.Tensor] = dict(getattr(self.core_model, "aux_losses", {}) or {})
        for k, v in ctx.aux_losses.items():
            if torch.is_tensor(v):
                aux[k] = aux[k] + v if k in aux else v
        total = loss + sum(v.float().reshape(()) for v in aux.values()) if aux else loss
        ctx.extra.pop("logits", None)
        return total, {"lm": loss.detach(), **{k: v.detach() for k, v in aux.items()}}

    @torch.no_grad()
    def evaluate(self, max_batches: Optional[int] = None) -> Optional[float]:
        """Token-mean loss over the validation split: the first ``max_batches`` batches (default
        ``training.eval_batches``; null: all of it, which the loss used to stop at 20 batches of without saying)."""
        if max_batches is None:
            max_batches = self.t.get("eval_batches")
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise ValueError(f"max_batches: expected an int >= 1 or None (the whole split), got {max_batches!r}")
        if self.val_data is None:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for x, y in self.val_data.sequential(max_batches):
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = self.model(x)
            # summed, then divided by all tokens: the last batch may hold fewer windows
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum",
                                     ignore_index=IGNORE_INDEX).item()
            count += int((y != IGNORE_INDEX).sum())  # the tail window's targets scored already do not count
        self.model.train(was_training)  # the mode it had (it was always left in training mode)
        return total / max(count, 1)

    def fit(self, stop_at_step: Optional[int] = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or stop after optimizer step ``stop_at_step``, saving a checkpoint, as an
        interrupted run would). Returns a summary (losses, steps, wall time, tokens/s, checkpoint path)."""
        if stop_at_step is not None:
            if isinstance(stop_at_step, bool) or not isinstance(stop_at_step, int):
                raise TypeError(f"stop_at_step: expected an int or None, got {type(stop_at_step).__name__}")
            if stop_at_step <= self.step:
                raise ValueError(f"stop_at_step: expected a step after the current one ({self.step}), "
                                 f"got {stop_at_step}")
        t = self.t
        if self._rng_at_ready is not None:
            ckpt.restore_rng(self._rng_at_ready)
            self._rng_at_ready = None
        accum = self.grad_accum
        clip = t.get("grad_clip")
        log_every = int(t.get("log_every", 10))
        save_every = t.get("save_every")
        bar = _progress_bar(self.total_steps, self.step, bool(t.get("progress", True)))
        self.model.train()
        start = time.perf_counter()
        tokens_at_start = self.tokens_seen
        ctx = self._sync_ctx()
        self.plugins.broadcast("on_training_start", ctx)
        # a profile or plugin state the checkpoint cannot hold (a YAML date in a plugin's settings, a numpy scalar)
        # fails now, not at the first save (the end of the first epoch, maybe of the run)
        ckpt.check_weights_only({"profile": dict(self.cfg), "plugins": self.plugins.state_dict(),
                                 "tokenizer": self.tokenizer.state_dict() if self.tokenizer is not None else {}})
        stopped = False
        # (tokens_seen, RNG states) when the optimizer step in flight started; None between steps. A Ctrl-C
        # mid-step rolls back to it, so the resumed run redraws that step's dropout / noise exactly.
        at_step_start: Optional[tuple[int, dict[str, Any]]] = None
        try:
            while self.step < self.total_steps and not stopped:
                ctx = self._sync_ctx()
                ctx.extra["resumed_mid_epoch"] = self.batch_in_epoch > 0
                self.plugins.broadcast("on_epoch_start", ctx)
                n_micro = self.steps_per_epoch * accum
                batches = self.data.batches(self.epoch, n_micro, skip=self.batch_in_epoch)
                step_losses: list[torch.Tensor] = []
                parts_sum: dict[str, torch.Tensor] = {}
                for x, y in batches:
                    if self.batch_in_epoch % accum == 0:
                        at_step_start = (self.tokens_seen, ckpt.capture_rng())
                        self.optimizer.zero_grad(set_to_none=True)
                        step_losses, parts_sum = [], {}
                        ctx = self._sync_ctx(batch=(x, y))
                        ctx.metrics.clear()  # metrics describe one step; plugins refill them from here
                        self.ctx.aux_losses = {}
                        self.plugins.broadcast("on_step_start", ctx)
                    self.ctx.aux_losses = {}
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    self.ctx.batch = (x, y)
                    total, parts = self._forward_loss(x, y)
                    scaled = total / accum
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    step_losses.append(total.detach())  # no host sync per micro-batch
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum[k] + v / accum if k in parts_sum else v / accum
                    self.batch_in_epoch += 1
                    self.tokens_seen += x.numel()
                    if self.batch_in_epoch % accum:
                        continue
                    # optimizer step
                    with _hold_ctrl_c():
                        loss, lr, grad_norm = self._optimizer_step(clip, step_losses)
                        at_step_start = None
                    ctx = self._sync_ctx(loss=loss)
                    ctx.metrics.update({"loss": loss, "lr": lr, "grad_norm": grad_norm,
                                        **{f"loss_{k}": float(v) for k, v in parts_sum.items()}})
                    elapsed = time.perf_counter() - start
                    tps = (self.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                    ctx.metrics["tokens_per_s"] = tps
                    self.plugins.broadcast("on_step_end", ctx)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", epoch=self.epoch)
                    if self.step % log_every == 0 or self.step == 1:
                        # the loss's parts (lm, the MoE balance / z losses, plugins' terms), already on the host
                        terms = [f"{k[5:]} {v:.4f}" for k, v in ctx.metrics.items()
                                 if k.startswith("loss_") and isinstance(v, float)]
                        logger.info("epoch %d step %d/%d loss %.4f%s lr %.2e %.0f tok/s", self.epoch, self.step,
                                    self.total_steps, loss, f" ({' '.join(terms)})" if len(terms) > 1 else "", lr,
                                    tps)
                    if save_every and self.step % int(save_every) == 0:
                        self.save_checkpoint()
                    if self.step >= self.total_steps or (stop_at_step is not None and self.step >= stop_at_step):
                        stopped = self.step < self.total_steps or self.batch_in_epoch < n_micro
                        break
                if stopped:
                    break
                # end of epoch
                val = self.evaluate() if t.get("eval", True) else None
                if val is not None:
                    self.val_history.append(val)
                    self.val_step = self.step
                ctx = self._sync_ctx()
                ctx.metrics["val_loss"] = val
                self.plugins.broadcast("on_epoch_end", ctx)
                self.epoch += 1
                self.batch_in_epoch = 0
                self.save_checkpoint()
            if stopped:
                self.save_checkpoint()
        except KeyboardInterrupt:
            # keep what was learnt: roll back to the last whole optimizer step and save, so --resume continues
            self.batch_in_epoch -= self.batch_in_epoch % accum
            rng = None
            if at_step_start is not None:  # stopped inside a step: its micro-batches are redone on resume
                self.tokens_seen, rng = at_step_start
            path = self.save_checkpoint(rng=rng)
            logger.warning("interrupted at epoch %d step %d; checkpoint saved to %s", self.epoch, self.step, path)
            raise
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - start
        ctx = self._sync_ctx()
        self.plugins.broadcast("on_training_end", ctx)
        summary = {"steps": self.step, "epochs": self.epoch, "wall_s": wall,
                   "first_loss": self.history[0] if self.history else None,
                   "final_loss": self.history[-1] if self.history else None,
                   "val_losses": list(self.val_history), "val_step": self.val_step,
                   "tokens_per_s": (self.tokens_seen - tokens_at_start) / max(wall, 1e-9),
                   "checkpoint": str(self.checkpoint_path), "disabled_plugins": dict(self.plugins.disabled),
                   # before total_steps; reaching it mid-epoch (max_steps) skips the epoch end but is no early stop
                   "stopped_early": self.step < self.total_steps}
        logger.info("training done: %s", summary)
        return summary


def train(profile: Any, overrides: Any = None, plugins: Optional[Sequence[str]] = None,
          **trainer_kw: Any) -> dict[str, Any]:
    """Load a profile (name, path or mapping), train, return the summary."""
    from ..core.config import load_profile

    cfg = load_profile(profile, overrides, plugins=plugins)
    return Trainer(cfg, **trainer_kw).fit()


__all__ = ["Trainer", "amp_dtype", "lr_factor", "pick_device", "train"]
