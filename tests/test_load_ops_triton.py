"""apt_kernels.load_ops() registers every torch.ops.apt op an exported program can call, the Triton TVA ones included
(they are defined in apt_kernels/triton/tva.py, which apt_kernels.ops imports only at the first Triton TVA call).
Was: a bf16 TVA model exported on a GPU (impl="auto" picks Triton there) failed to load in a fresh process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from apt_kernels import backends


@pytest.mark.skipif(not backends._triton_import()[0], reason="needs triton installed")
def test_load_ops_registers_the_triton_tva_ops(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton path on CPU tensors; export traces the fake only
    import apt_kernels as K

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return K.tva_attention(q, k, v, causal=True, impl="triton")

    ep = torch.export.export(M(), tuple(torch.randn(1, 2, 16, 16) for _ in range(3)))
    assert any("tva_attention_triton" in str(n.target) for n in ep.graph.nodes)
    torch.export.save(ep, tmp_path / "tva.pt2")
    code = textwrap.dedent(f"""
        import torch, apt_kernels
        apt_kernels.load_ops()
        assert hasattr(torch.ops.apt, "tva_attention_triton")
        torch.export.load({str(tmp_path / 'tva.pt2')!r})
    """)
    # cwd outside the checkout (see test_export_stack.py); no TRITON_INTERPRET needed to register
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
