"""CorDA's damping loop: a non-finite or uninvertible covariance is a clear error, never a hang."""

import pytest
import torch

from sclora.methods.corda import MAX_DAMPING_DOUBLINGS, corda_factors


@pytest.fixture
def counted_inv(monkeypatch):
    """torch.linalg.inv that counts its calls and stops a loop that would never end (the old behaviour)."""
    calls = []
    inv = torch.linalg.inv

    def counting(m):
        calls.append(1)
        if len(calls) > 200:
            raise RuntimeError("the damping loop did not stop")
        return inv(m)

    monkeypatch.setattr(torch.linalg, "inv", counting)
    return calls


def spd(d=6, seed=0):
    x = torch.randn(3 * d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x / (3 * d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_covariance_is_an_error_before_the_damping_loop(counted_inv, bad):
    cov = spd()
    cov[2, 3] = cov[3, 2] = bad
    with pytest.raises(ValueError, match="input covariance of 'layer.q' is non-finite"):
        corda_factors(torch.randn(4, 6, dtype=torch.float64), cov, 2, 1.0, "ipa", name="'layer.q'")
    assert not counted_inv


def test_a_nonfinite_weight_is_an_error(counted_inv):
    weight = torch.randn(4, 6, dtype=torch.float64)
    weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight of this layer holds NaN or inf"):
        corda_factors(weight, spd(), 2, 1.0, "kpa")
    assert not counted_inv


def test_a_zero_covariance_is_an_error_not_a_linalg_crash():
    with pytest.raises(ValueError, match="cannot be inverted accurately.*mean\\(diag C\\) = 0"):
        corda_factors(torch.randn(4, 6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64), 2, 1.0, "ipa")


def test_the_damping_loop_is_bounded(counted_inv, monkeypatch):
    counting = torch.linalg.inv
    monkeypatch.setattr(torch.linalg, "inv", lambda m: torch.zeros_like(counting(m)))  # never accurate
    with pytest.raises(ValueError, match=f"cannot be inverted accurately even when damped by 0.01 \\* 2\\*\\*"
                                         f"{MAX_DAMPING_DOUBLINGS}"):
        corda_factors(torch.randn(4, 6, dtype=torch.float64), spd(), 2, 1.0, "ipa")
    assert len(counted_inv) == MAX_DAMPING_DOUBLINGS + 1

