"""TVAAttention built with a core name (the default "auto") pickles: torch.save(layer), spawn / forkserver workers."""
import io
import pickle

import pytest
import torch

from apt_kernels.layers.tva import TVAAttention


@pytest.mark.parametrize("core", ["auto", "reference", "cpu_native"])
def test_tva_attention_pickles(core):
    torch.manual_seed(0)
    layer = TVAAttention(32, 4, core=core).eval()
    x = torch.randn(2, 8, 32)
    again = pickle.loads(pickle.dumps(layer))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        want = layer(x)
        torch.testing.assert_close(again(x), want)
        torch.testing.assert_close(loaded(x), want)
    assert repr(again) == repr(layer)
