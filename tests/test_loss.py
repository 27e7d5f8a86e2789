import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training import loss as loss_module
from codistill.config import CodistillConfig, ConfigError
from codistill.fields import build
from training.loss import average_peer_probs, codistillation_loss, distill_weight

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
    parts = codistillation_loss(student(x), y, [p(x) for p in peers], step=0, cfg=CodistillConfig(), binary=False)
    parts.total.backward()
    assert parts.distill_loss.item() > 0
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for peer in peers for p in peer.parameters())


def test_burn_in_zeroes_the_term_and_total_is_pure_cross_entropy():
    student, targets, peers = make_lm_batch()
    cfg = CodistillConfig(weight=2.0, burn_in_steps=10)
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
    parts = codistillation_loss(student, targets, [], step=100, cfg=CodistillConfig(), binary=False)
    assert parts.total is parts.label_loss
    assert parts.distill_loss.item() == 0.0


def test_distill_weight_schedule():
    cfg = CodistillConfig(weight=0.5, burn_in_steps=10, ramp_steps=4)
    assert [distill_weight(s, cfg) for s in (0, 9, 10, 11, 13, 100)] == [0.0, 0.0, 0.125, 0.25, 0.5, 0.5]
    assert distill_weight(10, CodistillConfig(weight=0.5, burn_in_steps=10)) == 0.5


def test_target_is_mean_of_peer_probabilities_not_of_logits():
    peers = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]
    # Peer 1: (1/2, 1/2); peer 2: (3/4, 1/4); mean of probabilities (5/8, 3/8).
    target = average_peer_probs(peers, temperature=1.0, binary=False)
    torch.testing.assert_close(target, torch.tensor([[5 / 8, 3 / 8]]))
    # Averaging logits instead would give softmax([log(3)/2, 0]) = (0.634, 0.366).
    student = torch.tensor([[0.3, -0.2]])
    parts = codistillation_loss(student, torch.tensor([0]), peers, step=0, cfg=CodistillConfig(), binary=False)
    log_p = F.log_softmax(student, dim=-1)[0]
    torch.testing.assert_close(parts.distill_loss, -(5 / 8 * log_p[0] + 3 / 8 * log_p[1]))


def test_three_groups_two_peers_and_order_does_not_matter():
    student, targets, peers = make_lm_batch()
    cfg = CodistillConfig()
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
    cfg = CodistillConfig(distance=distance)
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
        parts = codistillation_loss(logits, targets, peers, 0, CodistillConfig(distance=distance), binary=False)
        parts.total.backward()
        results[distance] = (parts.distill_loss, logits.grad)
    target = average_peer_probs(peers, 1.0, binary=False)
    entropy = -(target * target.log()).sum(-1).mean()
    torch.testing.assert_close(results["ce"][0] - results["kl"][0], entropy)
    torch.testing.assert_close(results["ce"][1], results["kl"][1])
    # KL of a distribution to itself is zero.
    same = codistillation_loss(peers[0], targets, [peers[0]], 0, CodistillConfig(distance="kl"), binary=False)
    assert abs(same.distill_loss.item()) < 1e-6


def test_mse_logits_is_squared_error_to_mean_peer_logits():
    student, targets, peers = make_lm_batch()
    cfg = CodistillConfig(distance="mse_logits", temperature=4.0)  # temperature does not apply
    parts = codistillation_loss(student, targets, peers, 0, cfg, binary=False)
    expected = ((student - (peers[0] + peers[1]) / 2) ** 2).mean()
    torch.testing.assert_close(parts.distill_loss, expected)


def test_temperature_softens_both_sides_and_scales_by_t_squared():
    student, targets, peers = make_lm_batch()
    t = 3.0
    parts = codistillation_loss(student, targets, peers, 0, CodistillConfig(temperature=t), binary=False)
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
    cfg = CodistillConfig(temperature=t, distance=distance)
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
    parts = codistillation_loss(z, torch.tensor([1.0, 0.0, 1.0]), peers, 0, CodistillConfig(distance="mse_logits"),
                                binary=True, mask=mask)
    torch.testing.assert_close(parts.distill_loss, torch.tensor((1.0 + 1.0) / 2))


def test_shape_errors_are_clear():
    student, targets, peers = make_lm_batch()
    with pytest.raises(ValueError, match="multiclass"):
        codistillation_loss(student, targets.float().unsqueeze(-1), peers, 0, CodistillConfig(), binary=False)
    with pytest.raises(ValueError, match="binary"):
        codistillation_loss(student, targets, peers, 0, CodistillConfig(), binary=True)
    with pytest.raises(ValueError, match="peer 1"):
        codistillation_loss(student, targets, [peers[0], peers[1][:, :1]], 0, CodistillConfig(), binary=False)
    with pytest.raises(ConfigError, match="^codistill.distance: "):
        build(CodistillConfig, {"distance": "l1"}, "codistill")


# --- the fused soft-target cross-entropy, lazy peers, memory -------------------------------------------


def two_pass_reference(student, targets, peers, w, t, mask, kl=False):
    """CE(y) + w T^2 CE(p_bar(T), student / T) written out term by term (autograd does the gradient)."""
    keep = mask if mask is not None else torch.ones(targets.shape, dtype=torch.bool)
    label = F.cross_entropy(student[keep], targets[keep])
    target = sum(F.softmax(p[keep] / t, -1) for p in peers) / len(peers)
    distill = -(target * F.log_softmax(student[keep] / t, -1)).sum(-1).mean()
    if kl:
        distill = distill + (target * target.log()).sum(-1).mean()
    distill = t**2 * distill
    return label + w * distill, label, distill


@pytest.mark.parametrize("distance", ["ce", "kl"])
@pytest.mark.parametrize("t", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_loss_equals_the_two_pass_formula(monkeypatch, distance, t, masked):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 2 * V)  # two positions per chunk: chunking is exercised
    student, targets, peers = make_lm_batch(seed=3)
    peers.append(torch.randn(B, T, V, generator=torch.Generator().manual_seed(9)))
    mask = (torch.arange(T)[None, :] < torch.tensor([5, 3, 1])[:, None]) if masked else None
    w = 0.7
    cfg = CodistillConfig(weight=w, temperature=t, distance=distance)
    parts = codistillation_loss(student, targets, iter(peers), 0, cfg, binary=False, mask=mask)
    parts.total.backward()
    fused_grad, student.grad = student.grad, None
    total, label, distill = two_pass_reference(student, targets, peers, w, t, mask, kl=distance == "kl")
    total.backward()
    torch.testing.assert_close(parts.total, total)
    torch.testing.assert_close(parts.label_loss, label)
    torch.testing.assert_close(parts.distill_loss, distill)
    torch.testing.assert_close(fused_grad, student.grad)
    if masked:
        assert torch.all(fused_grad[~mask] == 0)


def test_at_temperature_one_it_is_one_cross_entropy_to_the_mixed_target():
    """CE(y) + w CE(p) = (1 + w) CE((onehot(y) + w p) / (1 + w))."""
    student, targets, peers = make_lm_batch(seed=4)
    w = 1.5
    parts = codistillation_loss(student, targets, peers, 0, CodistillConfig(weight=w), binary=False)
    mixed = (F.one_hot(targets, V).float() + w * average_peer_probs(peers, 1.0, binary=False)) / (1 + w)
    torch.testing.assert_close(parts.total, (1 + w) * F.cross_entropy(student.reshape(-1, V), mixed.reshape(-1, V)))


def test_burn_in_never_computes_the_peers():
    student, targets, peers = make_lm_batch()
    asked = []

    def lazy():
        for p in peers:
            asked.append(1)
            yield p

    cfg = CodistillConfig(burn_in_steps=5)
    codistillation_loss(student, targets, lazy(), step=4, cfg=cfg, binary=False)
    assert asked == []
    codistillation_loss(student, targets, lazy(), step=5, cfg=cfg, binary=False)
    assert len(asked) == 2


def live_buffers(min_bytes: int) -> int:
    """Distinct tensor storages of at least `min_bytes` reachable from Python right now."""
    gc.collect()
    return len({o.untyped_storage().data_ptr() for o in gc.get_objects()
                if torch.is_tensor(o) and o.untyped_storage().nbytes() >= min_bytes})


@pytest.mark.parametrize("distance", ["ce", "mse_logits"])
def test_peers_are_never_alive_together(distance):
    """Each peer's logits are released before the next peer is computed, and the loss's
    saved tensors do not grow with the number of peers."""
    n, v = 64, 512
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, v, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    big = n * v * 4

    def run(peer_count):
        alive, previous = [], []

        def lazy():
            for _ in range(peer_count):
                if previous:
                    alive.append(previous[-1]() is not None)
                alive.append(live_buffers(big))
                logits = torch.randn(n, v, generator=g)
                previous.append(weakref.ref(logits))
                yield logits
                del logits

        saved = []

        def pack(t):
            saved.append(t.untyped_storage().nbytes() >= big)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            parts = codistillation_loss(student, targets, lazy(), 0, CodistillConfig(distance=distance), binary=False)
        parts.total.backward()
        return alive, sum(saved)

    one, saved_one = run(1)
    three, saved_three = run(3)
    # [buffers when peer 0 is made, peer 0 alive?, buffers when peer 1 is made, ...]
    assert three[1::2] == [False, False]
    # When peer 1 and 2 are made, exactly one buffer more than for peer 0: the running mean.
    assert three[0] == one[0] and three[2] == three[4] == three[0] + 1
    assert saved_three == saved_one


def peak_loss_bytes(peer_count: int, n: int = 128, v: int = 2048) -> int:
    """Peak tensor bytes of the loss and its backward (torch's MemTracker), the student's logits included."""
    from torch.distributed._tools.mem_tracker import MemTracker

    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, v, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    tracker = MemTracker()
    tracker.track_external(student)
    with tracker:
        peers = (torch.randn(n, v, generator=g) for _ in range(peer_count))
        codistillation_loss(student, targets, peers, 0, CodistillConfig(), binary=False).total.backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_peak_memory_of_the_loss_does_not_grow_with_peers(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 16 * 2048)  # 16 of the 128 positions per chunk
    one, three = peak_loss_bytes(1), peak_loss_bytes(3)
    buffer = 128 * 2048 * 4
    assert three == one
    # The student's logits, one peer's logits, the peers' mean (the gradient comes once the peer is gone),
    # chunk temporaries: never a full-size log-softmax.
    assert one <= 3.5 * buffer, one / buffer


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_label_smoothing_of_the_fused_multiclass_loss_matches_torch(temperature):
    torch.manual_seed(0)
    logits = torch.randn(7, 11, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    peer = torch.randn(7, 11)
    cfg = CodistillConfig(weight=0.5, temperature=temperature)
    parts = codistillation_loss(logits, targets, [peer], step=3, cfg=cfg, binary=False, label_smoothing=0.1)
    label = F.cross_entropy(logits, targets, label_smoothing=0.1)
    target = torch.softmax(peer / temperature, -1)
    expected = label + 0.5 * temperature**2 * -(target * F.log_softmax(logits / temperature, -1)).sum(-1).mean()
    assert parts.label_loss.item() == pytest.approx(label.item(), rel=1e-6)
    grad, = torch.autograd.grad(parts.total, logits)
    expected_grad, = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)


def test_binary_label_smoothing_moves_targets_toward_the_base_rate():
    logits = torch.tensor([0.3, -1.0, 2.0])
    labels = torch.tensor([1.0, 0.0, 1.0])
    parts = codistillation_loss(logits, labels, [], step=0, cfg=CodistillConfig(), binary=True, label_smoothing=0.2,
                                label_prior=0.25)
    expected = F.binary_cross_entropy_with_logits(logits, 0.8 * labels + 0.2 * 0.25)
    assert parts.total.item() == pytest.approx(expected.item())

