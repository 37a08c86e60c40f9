"""The chunked, fused cross-entropy equals the plain one in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from cheers.losses import linear_cross_entropy


def _plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_matches_plain_cross_entropy_and_gradients(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    targets[[2, 5, 11]] = -100  # ignored positions count neither in the sum nor the mean
    ref = _plain(hidden, weight, targets)
    ref.mul(2.5).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ours = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    ours.mul(2.5).backward()  # an upstream gradient other than 1 scales the stored ones
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, gw, rtol=1e-5, atol=1e-6)


def test_frozen_weight_and_all_ignored():
    torch.manual_seed(1)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    targets = torch.full((6,), -100)
    loss = linear_cross_entropy(hidden, weight, targets, chunk=4)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0
    targets[0] = 3
    hidden.grad = None
    linear_cross_entropy(hidden, weight, targets).backward()
    ref = hidden.detach().clone().requires_grad_()
    _plain(ref, weight, targets).backward()
    torch.testing.assert_close(hidden.grad, ref.grad)


def test_no_grad_takes_the_plain_path_and_bad_shapes_are_named():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(9, 8), torch.tensor([1, 2, 3, -100])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), _plain(hidden, weight, targets))
    with pytest.raises(ValueError, match=r"weight \(9, 7\)"):
        linear_cross_entropy(hidden, torch.randn(9, 7), targets)
