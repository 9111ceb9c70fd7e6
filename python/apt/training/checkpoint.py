"""Checkpoints: one ``torch.save`` file holding everything to rebuild the model and to resume training exactly.

A training run writes ``<training.out_dir>/last.pt`` (:data:`CHECKPOINT_NAME`; out_dir defaults to
``apt_runs/<profile name>``) at every epoch end, every ``training.save_every`` steps and when it stops early.
Contents: ``format`` (version), ``profile`` (the full profile, model.vocab_size resolved), ``model`` (state dict),
``tokenizer`` (its state: byte, or the BPE merges), and for resuming ``optimizer``, ``scheduler``, ``scaler``,
``trainer`` (epoch, step, micro-batches consumed in the epoch, loss history), ``plugins`` and ``rng`` (torch CPU
and CUDA generator states, Python ``random``). Everything in it is tensors and plain containers, so :func:`load`
reads it with ``torch.load(weights_only=True)``: a file that needs more (arbitrary pickled objects, which can run
code when unpickled) is refused, never executed.

:func:`load_for_inference` -> ``(model, tokenizer, profile)`` with the model in eval mode on ``device``, in
``dtype`` (:func:`inference_dtype`: ``auto`` is bf16 on CUDA, fp32 on the CPU).
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import pickle
import random
import re
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

try:  # advisory locks: a live writer holds one on its temp file (released by the kernel when the process dies)
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file is missing, unreadable or not an apt checkpoint."""


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu() if torch.is_tensor(state["torch"]) else state["torch"])
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]) if isinstance(py, (list, tuple)) else py)
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d: not restored",
                           len(cuda), torch.cuda.device_count())


def _refused_global(exc: BaseException) -> Optional[str]:
    """The "GLOBAL module.name" line of the weights-only unpickler's refusal, None for any other error."""
    if not isinstance(exc, pickle.UnpicklingError):
        return None
    line = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln), None)
    # just the global: the rest of torch's line ("Please use torch.serialization.add_safe_globals([...]) ... if you
    # trust this class") is advice no apt command can follow, next to apt saying it will not load such objects
    m = re.search(r"GLOBAL\s+([\w.]+)", line or "")
    return f"GLOBAL {m.group(1)}" if m else line


def out_of_memory_reason(exc: BaseException) -> Optional[str]:
    """The allocation a CPU-allocator / CUDA out-of-memory RuntimeError failed on ("you tried to allocate N
    bytes", else its first line), for a one-line error; None for any other error (to be raised as it is)."""
    text = str(exc)
    if "out of memory" not in text.lower() and "can't allocate memory" not in text:
        return None
    return text[text.find("you tried to allocate"):].split(".")[0] if "you tried" in text else text.splitlines()[0]


def check_weights_only(blob: Mapping[str, Any]) -> None:
    """:func:`load` reads with ``weights_only=True``: refuse to write what it would refuse to read (a plugin's
    state_dict holding a numpy scalar or a dataclass), naming the part, before the file is replaced."""
    for part in ("profile", "tokenizer", "trainer", "plugins"):
        if part not in blob:
            continue
        buf = io.BytesIO()
        torch.save(blob[part], buf)
        buf.seek(0)
        try:
            torch.load(buf, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise TypeError(f"checkpoint part {part!r} holds a Python object that torch.load(weights_only=True) "
                            f"refuses ({_refused_global(exc) or exc}); plugin state_dict()s and the profile "
                            "must hold only tensors, dict/list/tuple, str, int, float, bool and None") from None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself under its wrappers: DistributedDataParallel / DataParallel (``.module``) and torch.compile
    (``._orig_mod``), whose state dicts prefix every key (``module.``, ``_orig_mod.``) and which do not forward the
    model's own attributes (``aux_losses``, ``hidden_states``, ``moe_layers``, ``config``)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
    return model


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state: Mapping[str, Any], model: torch.nn.Module) -> Mapping[str, Any]:
    """``state`` keyed for the bare ``model``: checkpoints written before :func:`unwrap_model` was applied on save
    hold a DDP / torch.compile wrapper's keys (``module.``, ``_orig_mod.``); such a prefix, on every key and on none
    of the model's own, is dropped (``state`` itself is returned when there is none)."""
    own = list(model.state_dict().keys())
    out: Any = state
    stripped = True
    while out and stripped:
        stripped = False
        for pre in _WRAPPER_PREFIXES:
            if all(k.startswith(pre) for k in out) and not any(k.startswith(pre) for k in own):
                meta = getattr(out, "_metadata", None)
                out = collections.OrderedDict((k[len(pre):], v) for k, v in out.items())
                if meta is not None:  # per-module versions, keyed by module path ("module.embed" -> "embed")
                    out._metadata = type(meta)((k[len(pre):] if k.startswith(pre) else "" if k == pre[:-1] else k,
                                                v) for k, v in meta.items())
                stripped = True
    return out


_HOST = socket.gethostname().replace(os.sep, "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError among them
        return True  # someone else's live process (or cannot tell): keep its file
    return True


def _remove_dead_writers_tmp(path: Path) -> None:
    """Best effort: the temp files of ``path`` left on this host by writers that no longer run (a save killed
    mid-write). Another host's files, and a live process's, are never touched."""
    if fcntl is None:  # no locks to tell a live writer by (and os.kill(pid, 0) on Windows sends CTRL_C_EVENT)
        return
    prefix = f"{path.name}.{_HOST}."
    with contextlib.suppress(OSError):
        for other in path.parent.iterdir():
            name = other.name
            if not (name.startswith(prefix) and name.endswith(".tmp")):
                continue
            pid = name[len(prefix):-len(".tmp")].split(".")[0]
            if not (pid.isascii() and pid.isdigit()) or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            # the pid alone is not enough: a writer in another PID namespace with the same host name (containers
            # sharing the node's hostname: docker --network host, hostNetwork pods) has a pid this process cannot
            # see. Its lock is visible: remove the file only when nobody holds it.
            with contextlib.suppress(OSError):
                with open(other, "rb") as g:
                    fcntl.flock(g.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: held by a live writer
                    other.unlink()


def save(path: Union[str, os.PathLike], model: torch.nn.Module, profile: Mapping[str, Any], tokenizer: Any,
         optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None, scaler: Any = None,
         trainer_state: Optional[Mapping[str, Any]] = None, plugin_state: Optional[Mapping[str, Any]] = None,
         rng: Union[bool, Mapping[str, Any]] = True) -> Path:
    """Write a checkpoint atomically (temporary file, then rename) and return its path. ``rng``: True stores the
    generators' current states, a mapping from :func:`capture_rng` stores those, False none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "profile": dict(profile),
        # the unwrapped model's keys: a DDP or torch.compile wrapper's state dict prefixes each key (module.,
        # _orig_mod.), which load_for_inference and a resume with the bare model then refused
        "model": unwrap_model(model).state_dict(),
        "tokenizer": tokenizer.state_dict() if tokenizer is not None else {"type": "byte"},
    }
    if optimizer is not None:
        blob["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        blob["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        blob["scaler"] = scaler.state_dict()
    if trainer_state is not None:
        blob["trainer"] = dict(trainer_state)
    if plugin_state is not None:
        blob["plugins"] = dict(plugin_state)
    if isinstance(rng, Mapping):
        blob["rng"] = dict(rng)
    elif rng:
        blob["rng"] = capture_rng()
    if path.is_dir():
        raise IsADirectoryError(f"cannot write checkpoint {path}: it is a directory")
    # a temp name of this writer's own: processes saving to one path (every rank of a torchrun job) renamed or
    # unlinked each other's shared 'last.pt.tmp' mid-write; "x": never another writer's file (umask applies)
    # The host is in the name so that a later save can tell a dead writer's file (killed mid-write: preempted, OOM)
    # from a live one's: with a fresh name per save, each such crash otherwise left a checkpoint-sized file for good
    tmp = path.with_name(f"{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        check_weights_only(blob)  # before the temp file: what load() would refuse is never written
        with open(tmp, "xb") as f:
            if fcntl is not None:  # this file is a live writer's (see _remove_dead_writers_tmp)
                with contextlib.suppress(OSError):
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them last.pt
            if fcntl is not None:  # renamed while still locked: never swept between the close and the rename
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
    except BaseException as exc:  # disk full, Ctrl-C mid-write: the previous checkpoint stays whole, no litter
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, IsADirectoryError):
            raise OSError(exc.errno, f"cannot write checkpoint {path} ({exc.strerror or exc}); the previous "
                                     "one, if any, is intact") from None
        raise
    _remove_dead_writers_tmp(path)
    with contextlib.suppress(OSError):  # the rename itself survives a power loss
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


RUN_LOCK_NAME = ".apt_train.lock"


def _is_global_rank_zero() -> bool:
    rank = os.environ.get("RANK", "0").strip()  # torchrun's global rank; unset: a single process
    return rank in ("", "0") or not rank.isdigit()


@contextlib.contextmanager
def run_lock(out_dir: Union[str, os.PathLike]) -> Iterator[Optional[Path]]:
    """Hold an advisory exclusive lock on ``<out_dir>/.apt_train.lock`` for the block: two ``apt train`` runs into
    one folder replaced each other's last.pt with no word. The kernel drops the lock when the process dies, so a
    killed run never leaves the folder locked. Only global rank 0 of a torchrun job takes it (every rank writes
    the same checkpoint, and ranks 1.. would lock themselves out); none on Windows (no fcntl). Yields the lock
    file's path, None when no lock is taken; raises CheckpointError when another process holds it."""
    if fcntl is None or not _is_global_rank_zero():
        yield None
        return
    path = Path(out_dir) / RUN_LOCK_NAME
    try:
        f = open(path, "a+")  # "a+": never truncates the holder's pid before the lock is ours
    except OSError as exc:
        logger.warning("cannot create %s (%s): this run does not guard %s against a second apt train", path,
                       exc.strerror or exc, out_dir)
        yield None
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live process
            f.seek(0)
            holder = f.read().strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise CheckpointError(f"another apt train{who} is writing to {out_dir}: two runs there would replace "
                                  "each other's checkpoint; wait for it to end or pick another --out-dir") from None
        except OSError as exc:  # a file system without flock (some NFS mounts): no guard, not a failed run
            logger.warning("cannot lock %s (%s): this run does not guard %s against a second apt train", path,
                           exc.strerror or exc, out_dir)
            yield None
            return
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield path  # released when the file closes (or the process dies)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # the weights-only unpickler's first line is "Weights only load failed..."; the reason is further down
    why = [ln for ln in lines if ln.startswith(("Unsupported", "Trying to load"))]
    return why[0] if why else lines[0] if lines else ""


def load(path: Union[str, os.PathLike], map_location: Any = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path} is a directory without a {CHECKPOINT_NAME} file")
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: cannot read checkpoint: the file is empty (a save cut short?)")
    try:
        # weights_only: an apt checkpoint is tensors and plain containers; anything else would run code on load
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a foreign pickle: refused below
            blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        refused = _refused_global(exc)
        if refused:
            raise CheckpointError(f"{path}: not an apt checkpoint: it holds pickled Python objects ({refused}), "
                                  "which apt does not load because unpickling them can run arbitrary code") from None
        detail = _first_line(exc)
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupted?): {type(exc).__name__}"
                              + (f": {detail}" if detail else "")) from None
    if not isinstance(blob, dict) or "model" not in blob or "profile" not in blob:
        raise CheckpointError(f"{path}: not an apt checkpoint (no 'model' / 'profile')")
    # the parts everything after this indexes into: a tampered or foreign file fails here, naming the part
    fmt = blob.get("format", FORMAT_VERSION)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r}; this apt reads format <= {FORMAT_VERSION} "
                              "(written by a newer apt?)")
    if not isinstance(blob["model"], Mapping):
        raise CheckpointError(f"{path}: 'model' is a {type(blob['model']).__name__}, expected a state dict")
    profile = blob["profile"]
    if not isinstance(profile, Mapping) or not isinstance(profile.get("model"), Mapping):
        raise CheckpointError(f"{path}: 'profile' has no 'model' section (not a profile an apt run stored)")
    tok = blob.get("tokenizer")
    if tok is not None and not isinstance(tok, Mapping):
        raise CheckpointError(f"{path}: 'tokenizer' is a {type(tok).__name__}, expected a tokenizer state")
    for part in ("trainer", "plugins", "rng", "optimizer", "scheduler", "scaler"):
        if part in blob and not isinstance(blob[part], Mapping):
            raise CheckpointError(f"{path}: '{part}' is a {type(blob[part]).__name__}, expected a mapping")
    return blob


INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_dtype(name: Union[str, torch.dtype, None], device: Union[str, torch.device]) -> torch.dtype:
    """The dtype to run a model in: a name of :data:`INFERENCE_DTYPES`, a dtype, or ``auto``/None: bf16 on a CUDA
    device that supports it (a decode step reads every weight, so half the bytes is about half the time), else
    fp32 (CPU matmuls in bf16/fp16 without native support run several times slower than in fp32)."""
    if isinstance(name, torch.dtype):
        if name not in INFERENCE_DTYPES.values():
            raise ValueError(f"dtype: expected one of {', '.join(INFERENCE_DTYPES)}, got {name}")
        return name
    if name is None or name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"dtype: expected auto or one of {', '.join(INFERENCE_DTYPES)}, got {name!r}")
    return INFERENCE_DTYPES[name]


def load_for_inference(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                       dtype: Union[str, torch.dtype, None] = "float32"
                       ) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, profile)`` from a checkpoint file (or a run directory holding ``last.pt``), the model
    in eval mode on ``device`` in ``dtype`` (see :func:`inference_dtype`; checkpoints hold fp32 weights)."""
    run_dtype = inference_dtype(dtype, device)
    from ..data.tokenizers import tokenizer_from_state
    from ..modeling.compose import ModelBuilder

    blob = load(path, map_location="cpu")
    profile = dict(blob["profile"])
    try:
        tokenizer = tokenizer_from_state(dict(blob.get("tokenizer") or {"type": "byte"}))
        model = ModelBuilder(profile, vocab_size=tokenizer.vocab_size).build()
    except RuntimeError as exc:  # sizes this machine cannot allocate (a tampered model.d_model, a far bigger model)
        why = out_of_memory_reason(exc)
        if why is None:
            raise
        raise CheckpointError(f"{path}: not enough memory to build the model its profile describes ({why})") from None
    except (KeyError, TypeError, ValueError) as exc:  # a stored profile this apt cannot build
        raise CheckpointError(f"{path}: cannot rebuild the model from the stored profile: {type(exc).__name__}: "
                              f"{exc}") from None
    try:
        missing, unexpected = model.load_state_dict(strip_wrapper_prefixes(blob["model"], model), strict=False)
    except RuntimeError as exc:  # size mismatches (strict=False only forgives missing / extra keys)
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0] if lines else ""
        raise CheckpointError(f"{path}: the weights do not fit the model the stored profile builds ({detail}); "
                              "was the profile in the checkpoint edited?") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: the model built from the stored profile does not match the weights "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}); a provider available when "
                              "training may be missing here (see `apt info`)")
    model.to(device=device, dtype=run_dtype).eval()
    return model, tokenizer, profile
