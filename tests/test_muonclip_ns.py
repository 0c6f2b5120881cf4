"""muonclip_ns.py: the Newton-Schulz variants MuonClip can be given (ns_variant=) for measuring.

    python -m pytest tests/test_muonclip_ns.py
"""
import pytest
import torch

import muonclip
from conftest import run_alone


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (24, 24)])
def test_polar_express_converges_to_the_polar_factor_and_gram_form_computes_the_same(shape):
    """Polar Express's per-step quintics (arXiv 2505.16932) converge to U V^T of the SVD, where Keller
    Jordan's quintic stalls about 0.3 away by design; the Gram form (Q, R iterated on the small Gram
    matrix, with its restart) is the same polynomial, so in float64 it agrees to rounding."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=gen, dtype=torch.float64))
    s = torch.logspace(-1, 0, min(shape), dtype=torch.float64)                 # condition number 10
    g = u @ torch.diag(s) @ v.T
    polar = u @ v.T
    express = muonclip.newton_schulz(g, steps=10, dtype=torch.float64, variant="polar_express")
    gram = muonclip.newton_schulz(g, steps=10, dtype=torch.float64, variant="gram")
    jordan = muonclip.newton_schulz(g, steps=10, dtype=torch.float64, variant="jordan")
    assert (express - polar).abs().max() < 1e-6
    assert (gram - express).abs().max() < 1e-9
    assert (jordan - polar).abs().max() > 0.05


def test_muonclip_ns_with_muonclip_alone_serves_the_variants(tmp_path):
    """muonclip_ns.py and muonclip.py copied alone: MuonClip(ns_variant="gram") steps with the Gram
    form; an unknown variant is refused at construction naming the field and the choices."""
    script = """
import torch, muonclip
p = torch.randn(8, 12, requires_grad=True)
p.grad = torch.randn(8, 12)
muonclip.MuonClip([{"params": [p], "use_muon": True}], lr=0.1, qk_clip_tau=None, ns_variant="gram").step()
assert muonclip.NS_VARIANTS == ("jordan", "polar_express", "gram")
try:
    muonclip.MuonClip([{"params": [p], "use_muon": True}], qk_clip_tau=None, ns_variant="cubic")
except ValueError as e:
    assert "ns_variant 'cubic' is not one of" in str(e), e
else:
    raise AssertionError("an unknown variant was accepted")
"""
    assert run_alone(tmp_path, ["muonclip.py", "muonclip_ns.py"], script).endswith("ok\n")
