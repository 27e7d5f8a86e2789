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

How strongly and in what way a group is pulled toward its peers is the manifest's `codistill` section
(`codistill.config.CodistillConfig`): weight, burn-in, ramp, temperature, distance.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from codistill.config import CodistillConfig

@dataclass(frozen=True)
class LossParts:
    """`total` is what to backpropagate; the parts are for logging.

    `distill_loss` is the unweighted distance D (including the T^2 factor), so it
    stays comparable across the ramp; total = label_loss + w(step) * distill_loss.
    """

    total: Tensor
    label_loss: Tensor
    distill_loss: Tensor


def distill_weight(step: int, cfg: CodistillConfig) -> float:
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
    peer_logits: Iterable[Tensor],
    step: int,
    cfg: CodistillConfig,
    *,
    binary: bool,
    mask: Tensor | None = None,
    label_smoothing: float = 0.0,
    label_prior: float = 0.5,
) -> LossParts:
    """Label loss plus the weighted distance to the peers' averaged prediction.

    binary=True: logits and targets share a shape; targets are 0/1 labels.
    binary=False: logits are [..., C], targets are class indices of shape [...].
    peer_logits: each peer's logits, shaped like `student_logits`: a sequence or a lazy
      iterable (e.g. a generator running one peer at a time). It is consumed one peer at a
      time and each peer's tensor is released before the next is asked for, so peak memory
      does not grow with the number of peers; it is not consumed at all while w(step) == 0.
      No peers gives total == label_loss exactly.
    mask: bool, shaped like `targets`; False marks padding.
    label_smoothing: epsilon of the label term (a control for the regularisation codistillation brings):
      binary targets move toward `label_prior` (the training base rate), multiclass toward uniform.
    """
    _check_shapes(student_logits, targets, binary, mask)
    w = distill_weight(step, cfg)
    peers = iter(peer_logits if w else ())
    if not binary and cfg.distance != "mse_logits":
        return _multiclass_soft_target_loss(student_logits, targets, peers, w, cfg, mask, label_smoothing)

    if mask is not None:
        mask = mask.bool()
        # Padding targets may be out of range (-100, pad id); any valid class keeps
        # cross_entropy happy and is masked out below.
        targets = targets.masked_fill(~mask, 0)
    if binary:
        soft = targets.to(student_logits.dtype)
        if label_smoothing:
            soft = (1 - label_smoothing) * soft + label_smoothing * label_prior
        per_position = F.binary_cross_entropy_with_logits(student_logits, soft, reduction="none")
    else:
        per_position = F.cross_entropy(
            student_logits.flatten(0, -2), targets.flatten(), reduction="none", label_smoothing=label_smoothing
        ).view(targets.shape)
    label_loss = _masked_mean(per_position, mask)

    checked = _checked_peers(peers, student_logits.shape)
    if cfg.distance == "mse_logits":
        mean_peer = _running_mean(checked, lambda z: z)
        if mean_peer is None:
            return _label_only(label_loss)
        per_position = (student_logits - mean_peer).square()
        if not binary:
            per_position = per_position.mean(dim=-1)
        distill = _masked_mean(per_position, mask)
    else:
        target = _running_mean(checked, lambda z: torch.sigmoid(z / cfg.temperature))
        if target is None:
            return _label_only(label_loss)
        scaled = student_logits / cfg.temperature
        per_position = F.binary_cross_entropy_with_logits(scaled, target, reduction="none")
        if cfg.distance == "kl":
            per_position = per_position + torch.xlogy(target, target) + torch.xlogy(1 - target, 1 - target)
        distill = cfg.temperature**2 * _masked_mean(per_position, mask)
    return LossParts(total=label_loss + w * distill, label_loss=label_loss, distill_loss=distill)


def average_peer_probs(peer_logits: Iterable[Tensor], temperature: float, binary: bool) -> Tensor:
    """The distillation target: the mean of the peers' probabilities (not of their logits).

    Binary tasks give P(y=1) per position; multiclass tasks a distribution over
    the last dimension.
    """
    to_probs = torch.sigmoid if binary else (lambda z: torch.softmax(z, dim=-1))
    mean = _running_mean(iter(peer_logits), lambda z: to_probs(z / temperature))
    if mean is None:
        raise ValueError("average_peer_probs needs at least one peer")
    return mean


# Positions per chunk of the multiclass loss: about this many logits at a time, so the temporaries
# over the vocabulary stay small next to the [N, V] tensors the loss must hold anyway.
CHUNK_ELEMENTS = 1 << 20


def _multiclass_soft_target_loss(student_logits: Tensor, targets: Tensor, peers: Iterator[Tensor], w: float,
                                 cfg: CodistillConfig, mask: Tensor | None, smoothing: float) -> LossParts:
    """"ce"/"kl" over a softmax: label and distillation terms as ONE soft-target cross-entropy.

    At temperature 1, CE(y) + w CE(p) = (1 + w) CE((onehot(y) + w p) / (1 + w)): one
    logsumexp over the vocabulary per position gives both terms (label = lse - x_y,
    distill = lse - p.x) and the backward pass is one softmax, (1 + w) softmax(x) -
    onehot(y) - w p. At T != 1 the distillation term needs the softmax of x / T as well
    (Hinton's T^2 scaling kept). Only real (unmasked) positions are computed, in chunks.
    """
    logits = student_logits.flatten(0, -2)
    vocab = logits.shape[-1]
    flat_targets = targets.flatten().long()
    # Without padding, chunks are views; with it, each chunk gathers its real positions.
    rows = None if mask is None or bool(mask.all()) else mask.flatten().nonzero().squeeze(1)
    positions = logits.shape[0] if rows is None else len(rows)
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    peer_probs = _mean_peer_probs(_checked_peers(peers, student_logits.shape), rows, positions, cfg.temperature,
                                  chunk)
    w = w if peer_probs is not None else 0.0
    total, label, distill = _SoftTargetCrossEntropy.apply(logits, flat_targets, rows, peer_probs, w,
                                                          cfg.temperature, chunk, smoothing)
    if peer_probs is None:
        return _label_only(total)
    if cfg.distance == "kl":  # KL = CE - H(p): the same gradient, a value that reads 0 on agreement
        neg_entropy = sum(torch.xlogy(peer_probs[s:s + chunk], peer_probs[s:s + chunk]).sum()
                          for s in range(0, positions, chunk))
        shift = cfg.temperature**2 * neg_entropy / max(positions, 1)  # a constant for the student
        distill, total = distill + shift, total + w * shift
    return LossParts(total=total, label_loss=label, distill_loss=distill)
class _SoftTargetCrossEntropy(torch.autograd.Function):
    """mean over real positions of CE(y_eps, x) + w T^2 CE(p, x / T), chunked over positions, where y_eps is the
    one-hot label smoothed toward uniform by `smoothing` (eps): CE(y_eps, x) = lse - (1 - eps) x_y - eps mean(x).

    Saves only what the loss holds anyway (the logits it was given, the peer target, one
    logsumexp per position) and recomputes the softmax chunk by chunk in backward, writing
    straight into the gradient, so no [N, V] log-softmax or product is ever materialised.
    Returns (total, label, distill); only `total` carries a gradient.
    """

    @staticmethod
    def forward(ctx, logits, targets, rows, peer_probs, w, temperature, chunk, smoothing):
        positions = logits.shape[0] if rows is None else len(rows)
        scale = 1.0 / max(positions, 1)
        lse = logits.new_empty(positions)
        lse_t = logits.new_empty(positions) if peer_probs is not None and temperature != 1 else None
        label = logits.new_zeros(())
        distill = logits.new_zeros(())
        for s in range(0, positions, chunk):
            x, y = _rows(logits, rows, s, chunk), _rows(targets, rows, s, chunk)
            log_probs = F.log_softmax(x, dim=-1)
            lse[s:s + chunk] = x[:, 0] - log_probs[:, 0]
            label -= (1 - smoothing) * log_probs.gather(1, y.unsqueeze(1)).sum()
            if smoothing:
                label -= smoothing * log_probs.mean(dim=1).sum()
            if peer_probs is not None:
                if lse_t is not None:
                    log_probs = F.log_softmax(x / temperature, dim=-1)
                    lse_t[s:s + chunk] = x[:, 0] / temperature - log_probs[:, 0]
                # The sum over the chunk's positions of p . log q is one flat dot product.
                distill -= torch.dot(peer_probs[s:s + chunk].flatten(), log_probs.flatten())
        label, distill = label * scale, distill * (scale * temperature**2)
        ctx.save_for_backward(logits, targets, rows, peer_probs, lse, lse_t)
        ctx.w, ctx.temperature, ctx.chunk, ctx.scale, ctx.smoothing = w, temperature, chunk, scale, smoothing
        ctx.mark_non_differentiable(label, distill)
        return label + w * distill, label, distill

    @staticmethod
    def backward(ctx, grad_total, _grad_label, _grad_distill):
        logits, targets, rows, peer_probs, lse, lse_t = ctx.saved_tensors
        w, temperature, chunk, smoothing = ctx.w, ctx.temperature, ctx.chunk, ctx.smoothing
        scale = grad_total * ctx.scale
        grad = torch.zeros_like(logits) if rows is not None else torch.empty_like(logits)
        for s in range(0, len(lse), chunk):
            x, y = _rows(logits, rows, s, chunk), _rows(targets, rows, s, chunk)
            g = grad[s:s + chunk] if rows is None else torch.empty_like(x)
            torch.sub(x, lse[s:s + chunk, None], out=g).exp_()  # softmax(x)
            if peer_probs is not None:
                p = peer_probs[s:s + chunk]
                if lse_t is None:  # d/dx [(1 + w) lse(x) - x_y - w p.x] = (1 + w) softmax(x) - onehot(y) - w p
                    torch.lerp(p, g, 1 + w, out=g)
                else:  # d/dx of w T^2 (lse(x / T) - p.x / T) = w T (softmax(x / T) - p)
                    g.add_(torch.exp(x / temperature - lse_t[s:s + chunk, None]).sub_(p), alpha=w * temperature)
            g[torch.arange(len(y), device=y.device), y] -= 1 - smoothing
            if smoothing:
                g.sub_(smoothing / g.shape[1])
            g.mul_(scale)
            if rows is not None:
                grad.index_copy_(0, rows[s:s + chunk], g)
        return grad, None, None, None, None, None, None, None


def _rows(tensor: Tensor, rows: Tensor | None, start: int, chunk: int) -> Tensor:
    """Chunk `start` of the real positions: a view without a mask, a small gathered copy with one."""
    return tensor[start:start + chunk] if rows is None else tensor.index_select(0, rows[start:start + chunk])


def _mean_peer_probs(peers: Iterator[Tensor], rows: Tensor | None, positions: int, temperature: float,
                     chunk: int) -> Tensor | None:
    """Mean of the peers' softmax(z / T) at the real positions, [positions, V]; None without peers.

    One peer at a time into one buffer, chunk by chunk: never more than one peer's logits alive here.
    """
    total, count = None, 0
    for logits in peers:
        flat = logits.flatten(0, -2)
        if total is None:
            total = flat.new_zeros(positions, flat.shape[-1])
        for s in range(0, positions, chunk):
            total[s:s + chunk] += torch.softmax(_rows(flat, rows, s, chunk) / temperature, dim=-1)
        count += 1
        del logits, flat  # released before the next peer is computed
    return None if total is None else total.div_(count)


def _running_mean(peers: Iterator[Tensor], transform) -> Tensor | None:
    total, count = None, 0
    for logits in peers:
        value = transform(logits)
        total = torch.zeros_like(value) if total is None else total  # never adds into a caller's tensor
        total.add_(value)
        count += 1
        del logits, value
    return None if total is None else total.div_(count)


def _checked_peers(peers: Iterator[Tensor], shape: torch.Size) -> Iterator[Tensor]:
    """The peers, detached (no gradient can reach a peer), each checked against the student's shape."""
    j = 0  # not enumerate(): its cached result tuple would keep the previous peer alive
    for peer in peers:
        if peer.shape != shape:
            raise ValueError(f"peer {j} logits {tuple(peer.shape)} differ from student logits {tuple(shape)}")
        yield peer.detach()
        del peer
        j += 1


def _label_only(label_loss: Tensor) -> LossParts:
    return LossParts(total=label_loss, label_loss=label_loss, distill_loss=label_loss.new_zeros(()))


def _masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_position.mean()
    # where(), not multiplication, so non-finite values at padded positions cannot leak in.
    kept = torch.where(mask, per_position, per_position.new_zeros(()))
    return kept.sum() / mask.sum().clamp_min(1)


def _check_shapes(student_logits: Tensor, targets: Tensor, binary: bool, mask: Tensor | None) -> None:
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
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the targets' shape {tuple(targets.shape)}")
