"""The codistillation loss (Anil et al. 2018, arXiv:1804.03235, eq. 1).

    L_i = CE(y, f_i(x)) + w(step) * D(mean_{j != i} p_j(x), p_i(x))

p_j are the predicted distributions of the other groups' stale model copies on
group i's own batch. The caller runs those peers frozen, in eval mode and under
`torch.no_grad()`; this module still detaches their logits so no gradient can
reach a peer even if the caller forgot.

Two kinds of task:

* binary (Criteo): logits have the same shape as the {0, 1} labels and define a
  Bernoulli distribution through a sigmoid, treated as a 2-class distribution;
* multiclass (language model, ImageNet): logits are [..., C] (e.g. [B, T, V] or
  [B, C]) with integer targets of shape [...], through a softmax.

An optional boolean mask of the targets' shape marks the real positions;
padding is excluded from both terms and both are averaged over real positions.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Distance = Literal["ce", "kl", "mse_logits"]
DISTANCES: tuple[Distance, ...] = ("ce", "kl", "mse_logits")


@dataclass(frozen=True)
class DistillConfig:
    """How strongly and in what way a group is pulled toward its peers.

    distance:
      "ce"          cross-entropy from the averaged peer distribution to the student's.
      "kl"          KL(target || student): the same gradient as "ce"; the value is
                    lower by the target's entropy, so it reads 0 when a group agrees
                    with its peers.
      "mse_logits"  mean squared error between the student's logits and the mean of
                    the peers' logits, averaged over every logit entry of the real
                    positions (temperature does not apply).
    temperature: for "ce"/"kl", both student and peer distributions are computed from
      logits / T, and the term is multiplied by T^2 (Hinton et al. 2015) so that its
      gradient keeps roughly the same size whatever T is.
    weight, burn_in_steps, ramp_steps: see `distill_weight`.
    """

    weight: float = 1.0
    burn_in_steps: int = 0
    ramp_steps: int = 0
    temperature: float = 1.0
    distance: Distance = "ce"

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"distillation weight must be >= 0, got {self.weight}")
        if self.burn_in_steps < 0:
            raise ValueError(f"burn_in_steps must be >= 0, got {self.burn_in_steps}")
        if self.ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {self.ramp_steps}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")


@dataclass(frozen=True)
class LossParts:
    """`total` is what to backpropagate; the parts are for logging.

    `distill_loss` is the unweighted distance D (including the T^2 factor), so it
    stays comparable across the ramp; total = label_loss + w(step) * distill_loss.
    """

    total: Tensor
    label_loss: Tensor
    distill_loss: Tensor


def distill_weight(step: int, cfg: DistillConfig) -> float:
    """w(step): 0 during burn-in, then `weight`, reached linearly over `ramp_steps`.

    Burn-in matters because early peers predict noise; the paper starts
    distilling only once models have trained for a while.
    """
    if step < cfg.burn_in_steps:
        return 0.0
    if cfg.ramp_steps == 0:
        return cfg.weight
    return cfg.weight * min(1.0, (step - cfg.burn_in_steps + 1) / cfg.ramp_steps)


def codistillation_loss(
    student_logits: Tensor,
    targets: Tensor,
    peer_logits: Sequence[Tensor],
    step: int,
    cfg: DistillConfig,
    *,
    binary: bool,
    mask: Tensor | None = None,
) -> LossParts:
    """Label loss plus the weighted distance to the peers' averaged prediction.

    binary=True: logits and targets share a shape; targets are 0/1 labels.
    binary=False: logits are [..., C], targets are class indices of shape [...].
    peer_logits: one tensor per usable peer, each shaped like `student_logits`;
      an empty sequence gives total == label_loss exactly.
    mask: bool, shaped like `targets`; False marks padding.
    """
    _check_shapes(student_logits, targets, peer_logits, binary, mask)
    if mask is not None:
        mask = mask.bool()
        # Padding targets may be out of range (-100, pad id); any valid class keeps
        # cross_entropy happy and is masked out below.
        targets = targets.masked_fill(~mask, 0)

    if binary:
        per_position = F.binary_cross_entropy_with_logits(
            student_logits, targets.to(student_logits.dtype), reduction="none"
        )
    else:
        per_position = F.cross_entropy(
            student_logits.flatten(0, -2), targets.flatten(), reduction="none"
        ).view(targets.shape)
    label_loss = _masked_mean(per_position, mask)

    w = distill_weight(step, cfg)
    if not peer_logits or w == 0.0:
        return LossParts(total=label_loss, label_loss=label_loss, distill_loss=label_loss.new_zeros(()))

    peers = [p.detach() for p in peer_logits]
    if cfg.distance == "mse_logits":
        mean_peer = torch.stack(peers).mean(dim=0)
        per_position = (student_logits - mean_peer).square()
        if not binary:
            per_position = per_position.mean(dim=-1)
        distill = _masked_mean(per_position, mask)
    else:
        per_position = _soft_cross_entropy(student_logits, peers, cfg.temperature, binary, cfg.distance == "kl")
        distill = cfg.temperature**2 * _masked_mean(per_position, mask)
    return LossParts(total=label_loss + w * distill, label_loss=label_loss, distill_loss=distill)


def average_peer_probs(peer_logits: Sequence[Tensor], temperature: float, binary: bool) -> Tensor:
    """The distillation target: the mean of the peers' probabilities (not of their logits).

    Binary tasks give P(y=1) per position; multiclass tasks a distribution over
    the last dimension.
    """
    to_probs = torch.sigmoid if binary else (lambda z: torch.softmax(z, dim=-1))
    total = to_probs(peer_logits[0].detach() / temperature)
    for logits in peer_logits[1:]:  # a running sum keeps one [..., C] buffer, not one per peer
        total = total + to_probs(logits.detach() / temperature)
    return total / len(peer_logits)


def _soft_cross_entropy(
    student_logits: Tensor, peers: Sequence[Tensor], temperature: float, binary: bool, kl: bool
) -> Tensor:
    """Per-position CE (or KL) from the averaged peer distribution to the student's."""
    target = average_peer_probs(peers, temperature, binary)
    scaled = student_logits / temperature
    if binary:
        ce = F.binary_cross_entropy_with_logits(scaled, target, reduction="none")
        neg_entropy = torch.xlogy(target, target) + torch.xlogy(1 - target, 1 - target)
    else:
        ce = -(target * F.log_softmax(scaled, dim=-1)).sum(dim=-1)
        neg_entropy = torch.xlogy(target, target).sum(dim=-1)
    return ce + neg_entropy if kl else ce


def _masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_position.mean()
    # where(), not multiplication, so non-finite values at padded positions cannot leak in.
    kept = torch.where(mask, per_position, per_position.new_zeros(()))
    return kept.sum() / mask.sum().clamp_min(1)


def _check_shapes(
    student_logits: Tensor, targets: Tensor, peer_logits: Sequence[Tensor], binary: bool, mask: Tensor | None
) -> None:
    if binary:
        if student_logits.shape != targets.shape:
            raise ValueError(
                f"binary task: logits {tuple(student_logits.shape)} and targets "
                f"{tuple(targets.shape)} must have the same shape"
            )
    elif student_logits.dim() < 2 or student_logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"multiclass task: logits {tuple(student_logits.shape)} must be targets' shape "
            f"{tuple(targets.shape)} plus a class dimension"
        )
    for j, peer in enumerate(peer_logits):
        if peer.shape != student_logits.shape:
            raise ValueError(
                f"peer {j} logits {tuple(peer.shape)} differ from student logits {tuple(student_logits.shape)}"
            )
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the targets' shape {tuple(targets.shape)}")
