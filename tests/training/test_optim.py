import pytest
import torch

from twostage.errors import ConfigError
from twostage.training.optim import RowSparseAdam


def _steps(make_optimizer, rows_per_step, lrs):
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 4, sparse=True)
    optimizer = make_optimizer([table.weight])
    g = torch.Generator().manual_seed(1)
    for rows, lr in zip(rows_per_step, lrs, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        target = torch.randn(len(rows), 4, generator=g)
        ((table(rows) - target) ** 2).sum().backward()
        optimizer.step()
    return table.weight.detach(), optimizer.state[table.weight]


def test_row_sparse_adam_matches_torch_sparse_adam() -> None:
    """Repeated rows within a step, rows that skip steps, a changing learning rate."""
    steps = [
        torch.tensor([1, 2, 2, 7]),
        torch.tensor([7, 9]),
        torch.tensor([1, 1, 1, 30, 49]),
        torch.tensor([2]),
    ]
    lrs = [0.1, 0.05, 0.02, 0.2]
    ours, our_state = _steps(lambda p: RowSparseAdam(p, lr=0.1), steps, lrs)
    theirs, state = _steps(lambda p: torch.optim.SparseAdam(p, lr=0.1), steps, lrs)
    assert not torch.equal(ours, _steps(lambda p: RowSparseAdam(p), [], [])[0])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert our_state["step"] == state["step"] == 4
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(our_state[key], state[key], rtol=1e-6, atol=1e-9)


def test_row_sparse_adam_state_loads_into_torch_sparse_adam() -> None:
    table = torch.nn.Embedding(10, 3, sparse=True)
    ours = RowSparseAdam([table.weight], lr=0.1)
    table(torch.tensor([1, 4])).sum().backward()
    ours.step()
    theirs = torch.optim.SparseAdam([table.weight], lr=0.1)
    theirs.load_state_dict(ours.state_dict())
    assert theirs.state[table.weight]["step"] == 1


def test_row_sparse_adam_refuses_dense_gradients() -> None:
    weight = torch.nn.Parameter(torch.zeros(3, 2))
    weight.sum().backward()
    with pytest.raises(ConfigError, match="sparse gradients only"):
        RowSparseAdam([weight]).step()
