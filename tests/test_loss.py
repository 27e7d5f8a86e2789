import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.loss import DistillConfig, average_peer_probs, codistillation_loss, distill_weight

pytestmark = pytest.mark.timeout(60)

B, T, V = 3, 5, 7


def make_lm_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    peers = [torch.randn(B, T, V, generator=g) for _ in range(2)]
    return student, targets, peers


def test_no_gradient_reaches_peers_even_without_no_grad():
    torch.manual_seed(0)
    student, peers = nn.Linear(4, V), [nn.Linear(4, V), nn.Linear(4, V)]
    x, y = torch.randn(B, 4), torch.randint(0, V, (B,))
    # The caller "forgot" no_grad: the peer logits carry a graph into peer parameters.
    parts = codistillation_loss(student(x), y, [p(x) for p in peers], step=0, cfg=DistillConfig(), binary=False)
    parts.total.backward()
    assert parts.distill_loss.item() > 0
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for peer in peers for p in peer.parameters())


def test_burn_in_zeroes_the_term_and_total_is_pure_cross_entropy():
    student, targets, peers = make_lm_batch()
    cfg = DistillConfig(weight=2.0, burn_in_steps=10)
    parts = codistillation_loss(student, targets, peers, step=9, cfg=cfg, binary=False)
    expected = F.cross_entropy(student.reshape(-1, V), targets.reshape(-1))
    assert parts.total is parts.label_loss
    torch.testing.assert_close(parts.total, expected)
    assert parts.distill_loss.item() == 0.0
    after = codistillation_loss(student, targets, peers, step=10, cfg=cfg, binary=False)
    assert after.distill_loss.item() > 0
    torch.testing.assert_close(after.total, after.label_loss + 2.0 * after.distill_loss)


def test_no_peers_total_is_label_loss_exactly():
    student, targets, _ = make_lm_batch()
    parts = codistillation_loss(student, targets, [], step=100, cfg=DistillConfig(), binary=False)
    assert parts.total is parts.label_loss
    assert parts.distill_loss.item() == 0.0


def test_distill_weight_schedule():
    cfg = DistillConfig(weight=0.5, burn_in_steps=10, ramp_steps=4)
    assert [distill_weight(s, cfg) for s in (0, 9, 10, 11, 13, 100)] == [0.0, 0.0, 0.125, 0.25, 0.5, 0.5]
    assert distill_weight(10, DistillConfig(weight=0.5, burn_in_steps=10)) == 0.5


def test_target_is_mean_of_peer_probabilities_not_of_logits():
    peers = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]
    # Peer 1: (1/2, 1/2); peer 2: (3/4, 1/4); mean of probabilities (5/8, 3/8).
    target = average_peer_probs(peers, temperature=1.0, binary=False)
    torch.testing.assert_close(target, torch.tensor([[5 / 8, 3 / 8]]))
    # Averaging logits instead would give softmax([log(3)/2, 0]) = (0.634, 0.366).
    student = torch.tensor([[0.3, -0.2]])
    parts = codistillation_loss(student, torch.tensor([0]), peers, step=0, cfg=DistillConfig(), binary=False)
    log_p = F.log_softmax(student, dim=-1)[0]
    torch.testing.assert_close(parts.distill_loss, -(5 / 8 * log_p[0] + 3 / 8 * log_p[1]))


def test_three_groups_two_peers_and_order_does_not_matter():
    student, targets, peers = make_lm_batch()
    cfg = DistillConfig()
    a = codistillation_loss(student, targets, peers, step=0, cfg=cfg, binary=False)
    b = codistillation_loss(student, targets, peers[::-1], step=0, cfg=cfg, binary=False)
    torch.testing.assert_close(a.total, b.total)
    target = (peers[0].softmax(-1) + peers[1].softmax(-1)) / 2
    expected = -(target * student.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(a.distill_loss, expected)


@pytest.mark.parametrize("distance", ["ce", "kl", "mse_logits"])
def test_mask_excludes_padded_positions(distance):
    student, targets, peers = make_lm_batch()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -2:] = False
    cfg = DistillConfig(distance=distance)
    base = codistillation_loss(student, targets, peers, step=0, cfg=cfg, binary=False, mask=mask)

    changed_student = student.detach().clone()
    changed_student[~mask] = 1e4
    changed_peers = [p.clone() for p in peers]
    for p in changed_peers:
        p[~mask] = -50.0
    changed_targets = targets.masked_fill(~mask, -100)  # e.g. an ignore index, out of range
    other = codistillation_loss(changed_student, changed_targets, changed_peers, 0, cfg, binary=False, mask=mask)
    torch.testing.assert_close(other.label_loss, base.label_loss)
    torch.testing.assert_close(other.distill_loss, base.distill_loss)

    # Averaged over real positions only: equals the loss on the unpadded slice.
    sliced = codistillation_loss(student[:, :-2], targets[:, :-2], [p[:, :-2] for p in peers], 0, cfg, binary=False)
    torch.testing.assert_close(base.total, sliced.total)
    base.total.backward()
    assert torch.all(student.grad[~mask] == 0)


def test_kl_and_ce_differ_by_target_entropy_and_share_gradients():
    student, targets, peers = make_lm_batch()
    results = {}
    for distance in ("ce", "kl"):
        logits = student.detach().clone().requires_grad_()
        parts = codistillation_loss(logits, targets, peers, 0, DistillConfig(distance=distance), binary=False)
        parts.total.backward()
        results[distance] = (parts.distill_loss, logits.grad)
    target = average_peer_probs(peers, 1.0, binary=False)
    entropy = -(target * target.log()).sum(-1).mean()
    torch.testing.assert_close(results["ce"][0] - results["kl"][0], entropy)
    torch.testing.assert_close(results["ce"][1], results["kl"][1])
    # KL of a distribution to itself is zero.
    same = codistillation_loss(peers[0], targets, [peers[0]], 0, DistillConfig(distance="kl"), binary=False)
    assert abs(same.distill_loss.item()) < 1e-6


def test_mse_logits_is_squared_error_to_mean_peer_logits():
    student, targets, peers = make_lm_batch()
    cfg = DistillConfig(distance="mse_logits", temperature=4.0)  # temperature does not apply
    parts = codistillation_loss(student, targets, peers, 0, cfg, binary=False)
    expected = ((student - (peers[0] + peers[1]) / 2) ** 2).mean()
    torch.testing.assert_close(parts.distill_loss, expected)


def test_temperature_softens_both_sides_and_scales_by_t_squared():
    student, targets, peers = make_lm_batch()
    t = 3.0
    parts = codistillation_loss(student, targets, peers, 0, DistillConfig(temperature=t), binary=False)
    target = (F.softmax(peers[0] / t, -1) + F.softmax(peers[1] / t, -1)) / 2
    expected = t**2 * -(target * F.log_softmax(student / t, -1)).sum(-1).mean()
    torch.testing.assert_close(parts.distill_loss, expected)
    # The label term never uses the temperature.
    torch.testing.assert_close(parts.label_loss, F.cross_entropy(student.reshape(-1, V), targets.reshape(-1)))


@pytest.mark.parametrize("distance", ["ce", "kl"])
def test_binary_task_is_a_two_class_distribution(distance):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, generator=g, requires_grad=True)
    y = torch.randint(0, 2, (8,), generator=g).float()
    peers = [torch.randn(8, generator=g) for _ in range(2)]
    t = 2.0
    cfg = DistillConfig(temperature=t, distance=distance)
    parts = codistillation_loss(z, y, peers, 0, cfg, binary=True)
    torch.testing.assert_close(parts.label_loss, F.binary_cross_entropy_with_logits(z, y))

    # The same numbers through the multiclass path with logits (0, z): softmax == sigmoid.
    as_two_class = lambda logits: torch.stack([torch.zeros_like(logits), logits], dim=-1)  # noqa: E731
    multi = codistillation_loss(as_two_class(z), y.long(), [as_two_class(p) for p in peers], 0, cfg, binary=False)
    torch.testing.assert_close(parts.distill_loss, multi.distill_loss)
    torch.testing.assert_close(parts.total, multi.total)


def test_binary_mse_logits_and_mask():
    z = torch.tensor([0.5, -1.0, 2.0])
    peers = [torch.tensor([1.5, 0.0, 9.0])]
    mask = torch.tensor([True, True, False])
    parts = codistillation_loss(z, torch.tensor([1.0, 0.0, 1.0]), peers, 0, DistillConfig(distance="mse_logits"),
                                binary=True, mask=mask)
    torch.testing.assert_close(parts.distill_loss, torch.tensor((1.0 + 1.0) / 2))


def test_shape_errors_are_clear():
    student, targets, peers = make_lm_batch()
    with pytest.raises(ValueError, match="multiclass"):
        codistillation_loss(student, targets.float().unsqueeze(-1), peers, 0, DistillConfig(), binary=False)
    with pytest.raises(ValueError, match="binary"):
        codistillation_loss(student, targets, peers, 0, DistillConfig(), binary=True)
    with pytest.raises(ValueError, match="peer 1"):
        codistillation_loss(student, targets, [peers[0], peers[1][:, :1]], 0, DistillConfig(), binary=False)
    with pytest.raises(ValueError, match="distance"):
        DistillConfig(distance="l1")  # type: ignore[arg-type]
