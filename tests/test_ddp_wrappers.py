"""A model under DistributedDataParallel / torch.compile: checkpoints hold the bare model's keys and the trainer
sees the model's own attributes (MoE aux losses) through the wrapper. One-process gloo group, CPU."""
import socket

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from apt.core.config import load_profile
from apt.modeling.compose import ModelBuilder
from apt.training import checkpoint as ckpt
from apt.training.trainer import Trainer

MOE = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.moe.enabled": True,
       "model.moe.num_experts": 4, "model.moe.k": 1, "model.max_seq_len": 32, "data.seq_len": 16,
       "data.batch_size": 2, "training.max_steps": 1, "training.progress": False, "training.eval": False,
       "training.warmup_steps": 0}


@pytest.fixture(scope="module")
def group():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model(cfg):
    torch.manual_seed(0)
    return ModelBuilder(cfg, vocab_size=257).build()


@pytest.mark.parametrize("wrap", ["ddp", "compile"])
def test_checkpoint_of_wrapped_model_loads(group, tmp_path, wrap):
    cfg = load_profile("tiny_debug", overrides={"model.num_layers": 1})
    m = _model(cfg)
    wrapped = DDP(m) if wrap == "ddp" else torch.compile(m)
    p = ckpt.save(tmp_path / "last.pt", wrapped, {**cfg, "model": dict(m.config["model"])}, None)
    assert list(torch.load(p, weights_only=True)["model"]) == list(m.state_dict())
    model, _, _ = ckpt.load_for_inference(p)
    for a, b in zip(model.state_dict().values(), m.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_trainer_keeps_moe_losses_under_ddp(group, tmp_path):
    cfg = load_profile("tiny_debug", overrides=dict(MOE, **{"training.out_dir": str(tmp_path)}))
    tr = Trainer(cfg, model=DDP(_model(cfg), find_unused_parameters=True))
    x, y = next(iter(tr.data.batches(0, 1)))
    _, parts = tr._forward_loss(x, y)
    assert {"moe_balance", "moe_z"} <= set(parts)
    tr.save_checkpoint()
    Trainer(dict(cfg, training=dict(cfg["training"], resume="auto")), model=DDP(_model(cfg),
                                                                                find_unused_parameters=True))
    ckpt.load_for_inference(tmp_path / "last.pt")


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_checkpoint_written_with_wrapper_keys_still_loads(tmp_path, prefix):
    """Checkpoints saved before save() unwrapped the model hold the wrapper's keys: a resume (with the wrapped or
    the bare model) and load_for_inference take them."""
    cfg = load_profile("tiny_debug", overrides={"model.num_layers": 1, "training.out_dir": str(tmp_path),
                                                "training.progress": False, "training.max_steps": 1})
    m = _model(cfg)
    Trainer(cfg, model=m).save_checkpoint()
    path = tmp_path / "last.pt"
    blob = torch.load(path, weights_only=True)
    blob["model"] = {prefix + k: v for k, v in blob["model"].items()}
    torch.save(blob, path)
    model, _, _ = ckpt.load_for_inference(path)
    for a, b in zip(model.state_dict().values(), m.state_dict().values()):
        torch.testing.assert_close(a, b)
    resumed = dict(cfg, training=dict(cfg["training"], resume="auto"))
    Trainer(resumed, model=torch.compile(_model(cfg)))
    Trainer(resumed, model=_model(cfg))
