"""The SPO tensor math, as small pure functions (no models, no I/O).

The derivation, with each formula next to the function here that computes it, is docs/method.md; the § numbers
in the docstrings are its sections. Every per-pair input is a 1-D tensor of *summed completion log-probs*,
shape [B]: `x_chosen[b] = log x(y_w|x)`, `x_rejected[b] = log x(y_l|x)` for pair b.

Stages are numbered 1..N in the doc; Python lists here are 0-based, so **list index j is stage j+1**:

    betas[j]    = beta_{j+1}
    weights[j]  = [lambda_1^(j+1), ..., lambda_j^(j+1)]    (the weights stage j+1 used; weights[0] == [])
    logps[j]    = log-probs of pi_j                         (logps[0] is the base model pi_0)
    margins[j]  = Delta r_{j+1}                             (implicit reward margin of dimension j+1)

Nothing here modifies its inputs in place, and everything works in the dtype it is given.

Against TRL (details in docs/method.md §5.3): with no offset, `sigmoid` and `hinge` are TRL 1.x's
DPO losses on summed log-probs, equal to float rounding; TRL 1.x groups the margin as (pi_w - ref_w) -
(pi_l - ref_l), this module as (pi_w - pi_l) - (ref_w - ref_l) (TRL 0.x's `dpo_loss` order), so the last bits
can differ. `ipo` uses summed log-probs, where TRL 1.x divides each response's log-ratio by its token count.
`label_smoothing` is conservative DPO on the sigmoid loss (TRL 0.x's `sigmoid`); TRL 1.x's sigmoid has no
smoothing, and its `robust` loss is a different formula.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def log_ratio_margin(p_chosen: Tensor, p_rejected: Tensor, q_chosen: Tensor, q_rejected: Tensor) -> Tensor:
    """Delta(p, q) = [log p(y_w) - log q(y_w)] - [log p(y_l) - log q(y_l)], per pair.

    Evaluated as (p_w - p_l) - (q_w - q_l): `pi_logratios - ref_logratios`, the order of TRL 0.x's `dpo_loss`,
    which DPO through these functions therefore matches bit for bit. TRL 1.x evaluates (p_w - q_w) - (p_l - q_l):
    the same number up to float rounding, not always the same bits.
    """
    return (p_chosen - p_rejected) - (q_chosen - q_rejected)


def implicit_reward_margins(
    betas: Sequence[float],
    weights: Sequence[Sequence[float]],
    logps_chosen: Sequence[Tensor],
    logps_rejected: Sequence[Tensor],
) -> list[Tensor]:
    """Delta r_i for the dimensions of stages 1..k (§4), from the frozen models pi_0..pi_k on the same pairs.

        Delta r_1 = beta_1 * Delta(pi_1, pi_0)
        Delta r_i = beta_i * Delta(pi_i, pi_{i-1}) - sum_{m<i} lambda_m^(i) * Delta r_m

    0-based: `betas[j]` = beta_{j+1}; `weights[j]` = [lambda_1^(j+1) .. lambda_j^(j+1)], the weights stage j+1
    actually trained with (for a stage that ran in previous mode, `previous_mode_weights(alpha, j+1)`);
    `logps_*[j]` = log-probs of pi_j, so k+1 entries for k stages. Returns k tensors, `[j]` = Delta r_{j+1}.
    """
    k = len(betas)
    if len(weights) != k or len(logps_chosen) != k + 1 or len(logps_rejected) != k + 1:
        raise ValueError(f"need k betas, k weight lists and k+1 models' log-probs; got {k}, {len(weights)}, "
                         f"{len(logps_chosen)}, {len(logps_rejected)}")
    margins: list[Tensor] = []
    for j in range(k):
        if len(weights[j]) != j:
            raise ValueError(f"weights[{j}] (stage {j + 1}) must hold {j} lambdas, got {len(weights[j])}")
        step = betas[j] * log_ratio_margin(logps_chosen[j + 1], logps_rejected[j + 1],
                                           logps_chosen[j], logps_rejected[j])
        # Stage j+1 trained on R_{j+1} + sum lambda R_m; subtract the earlier part to isolate r_{j+1}.
        margins.append(step - spo_offset_all(weights[j], margins) if j else step)
    return margins


def spo_offset_all(weights_n: Sequence[float], reward_margins: Sequence[Tensor], like: Tensor | None = None) -> Tensor:
    """Exact ("all") mode offset of stage n: sum_{i<n} lambda_i^(n) * Delta r_i (§6.1).

    `weights_n[j]` = lambda_{j+1}^(n), `reward_margins[j]` = Delta r_{j+1} (from `implicit_reward_margins`).
    With no earlier dimension (stage 1) it is zero: `zeros_like(like)` if given, else a 0-d zero that
    broadcasts; either way h - 0 is DPO's h exactly.
    """
    if len(weights_n) != len(reward_margins):
        raise ValueError(f"{len(weights_n)} weights for {len(reward_margins)} earlier reward margins")
    if not reward_margins:
        return torch.zeros(()) if like is None else torch.zeros_like(like)
    total = weights_n[0] * reward_margins[0]
    for lam, margin in zip(weights_n[1:], reward_margins[1:]):
        total = total + lam * margin
    return total


def spo_offset_previous(
    alpha: float,
    beta_prev: float,
    prev_chosen: Tensor,
    prev_rejected: Tensor,
    prevprev_chosen: Tensor,
    prevprev_rejected: Tensor,
) -> Tensor:
    """Tractable ("previous") mode offset of stage n: alpha * beta_{n-1} * Delta(pi_{n-1}, pi_{n-2}) (§6.2).

    Equals `spo_offset_all` with `previous_mode_weights(alpha, n)`, provided stage n-1 used the weights it
    is recorded with. alpha == 0 returns an exact zero tensor (whatever the inputs hold, NaN included), so
    alpha = 0 is sequential DPO bit for bit.
    """
    if alpha == 0:
        return torch.zeros_like(prev_chosen)
    return alpha * beta_prev * log_ratio_margin(prev_chosen, prev_rejected, prevprev_chosen, prevprev_rejected)


def previous_mode_weights(alpha: float | Sequence[float], n: int) -> list[float]:
    """The lambda vector [lambda_1^(n), ..., lambda_{n-1}^(n)] that previous mode implies at stage n (§6.2).

    lambda_{n-1}^(n) = alpha_n and lambda_i^(n) = alpha_n * lambda_i^(n-1), i.e. lambda^(n) = alpha_n *
    (lambda^(n-1) ++ [1]). A float alpha is used at every stage (then lambda_i^(n) = alpha^(n-i)); a sequence
    gives per-stage alphas, `alpha[j]` for stage j+1 (alpha[0], stage 1's, is unused).
    """
    if n < 1:
        raise ValueError(f"stages are numbered from 1, got {n}")
    alphas = [float(alpha)] * n if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if len(alphas) < n:
        raise ValueError(f"need an alpha for each of {n} stages, got {len(alphas)}")
    lam: list[float] = []
    for stage in range(2, n + 1):
        a = alphas[stage - 1]
        lam = [a * x for x in lam] + [a]
    return lam


def spo_logits(
    beta: float,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    offset: Tensor | None = None,
) -> Tensor:
    """The SPO margin h = beta_n * Delta(pi_theta, pi_{n-1}) - offset (§5); offset None means 0 (plain DPO).

    The offset is a constant of the earlier models; it is detached so no gradient flows into it.
    """
    h = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return h if offset is None else h - offset.detach()


def sigmoid_loss(h: Tensor, beta: float, *, label_smoothing: float = 0.0) -> Tensor:
    """-(1 - eps) * logsigmoid(h) - eps * logsigmoid(-h), per pair (eps = label_smoothing; 0 is DPO's loss).

    eps > 0 is conservative DPO: each label is taken to be flipped with probability eps, so the loss is least at
    sigmoid(h) = 1 - eps instead of at h = +inf. `beta` is unused (h already carries it); it is a parameter so
    every loss in `LOSSES` is called the same way. eps in [0, 0.5) is checked once, by the configuration
    (`config.LossConfig`).
    """
    loss = -F.logsigmoid(h)
    # Skip the eps term when eps == 0 so the result is -logsigmoid(h) exactly, as in plain DPO.
    return loss if label_smoothing == 0 else (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-h)


def hinge_loss(h: Tensor, beta: float) -> Tensor:
    """relu(1 - h), per pair: TRL's hinge relu(1 - beta * Delta) with the SPO margin h in place of beta * Delta.

    `beta` is unused (h already carries it), as in `sigmoid_loss`.
    """
    return torch.relu(1 - h)


def ipo_loss(h: Tensor, beta: float) -> Tensor:
    """(h / beta - 1 / (2 * beta))**2, per pair: IPO's (Delta - 1/(2 beta))**2 with h / beta in place of Delta.

    h / beta = Delta(pi_theta, pi_{n-1}) - offset / beta, on *summed* log-probs. TRL 1.x divides each
    response's log-ratio by its completion token count first, so its IPO and this one differ whenever a
    response is longer than one token, and call for different betas.
    """
    return (h / beta - 1 / (2 * beta)) ** 2


@dataclass(frozen=True)
class LossSpec:
    """One preference loss of the SPO margin h: its per-pair function and what it is, in one line."""

    fn: Callable[..., Tensor]  # (h, beta) -> per-pair loss [B]; also label_smoothing= when takes_label_smoothing
    description: str
    takes_label_smoothing: bool = False


# The one list of loss types: config, CLI help and errors read their names and descriptions from here.
LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, "DPO's logistic loss -log sigmoid(h); with label_smoothing, conservative DPO",
                        takes_label_smoothing=True),
    "ipo": LossSpec(ipo_loss, "IPO: (h/beta - 1/(2 beta))^2 on summed log-probs, pulls h to 1/2 instead of +inf"),
    "hinge": LossSpec(hinge_loss, "hinge (SLiC): relu(1 - h), no gradient once h >= 1"),
}
LOSS_TYPES = tuple(LOSSES)


def preference_loss(h: Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> Tensor:
    """Per-pair loss [B] of the SPO margin h (from `spo_logits`) under `LOSSES[loss_type]`.

    label_smoothing only has a meaning for the losses that take it; the configuration (`config.LossConfig`) is the
    one place that checks the type, the smoothing's range and that the type takes it.
    """
    spec = LOSSES[loss_type]
    if spec.takes_label_smoothing:
        return spec.fn(h, beta, label_smoothing=label_smoothing)
    return spec.fn(h, beta)


def sft_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-pair SFT term [B]: the per-token NLL of the chosen response, -log pi_theta(y_w|x) / |y_w|.

    Lengths are completion token counts; clamped to >= 1 so an empty completion gives 0, not NaN. Each pair's
    NLL is averaged over its own tokens, so the batch mean weights pairs equally; TRL 1.x's `sft` loss averages
    over all chosen tokens of the batch, weighting long responses more (the same when lengths are equal).
    """
    return -policy_chosen_logps / chosen_lengths.clamp(min=1).to(policy_chosen_logps.dtype)


def reward_metric_sums(
    beta: float,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    offset: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-batch sums behind `reward_metrics`, plus "count" (the number of pairs), as 0-d tensors.

    Sums (not means) so a distributed engine can all-reduce them and divide once (`metrics_from_sums`).
    All share one float dtype (at least float32) and the inputs' device, so they can be stacked for one
    all-reduce. Implicit rewards are beta * (log pi_theta - log pi_ref), as in TRL.
    """
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    pc, pr = policy_chosen.detach().to(dtype), policy_rejected.detach().to(dtype)
    rc, rr = ref_chosen.detach().to(dtype), ref_rejected.detach().to(dtype)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    sums = {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracies": (chosen > rejected).to(dtype).sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "logps/chosen": pc.sum(),
        "logps/rejected": pr.sum(),
        "count": torch.tensor(float(pc.numel()), dtype=dtype, device=pc.device),
    }
    if offset is not None:
        off = offset.detach().to(dtype).expand_as(pc)  # a 0-d stage-1 offset counts once per pair
        h = spo_logits(beta, pc, pr, rc, rr, off)
        sums["spo/offset"] = off.sum()
        sums["spo/margin_accuracy"] = (h > 0).to(dtype).sum()
    return sums


def metrics_from_sums(sums: dict[str, Tensor]) -> dict[str, float]:
    """Means as python floats: each sum divided by sums["count"] (which is not itself returned)."""
    count = float(sums["count"])
    return {k: float(v) / count for k, v in sums.items() if k != "count"}


def reward_metrics(
    beta: float,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    offset: Tensor | None = None,
) -> dict[str, float]:
    """Batch means under TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
    logps/chosen, logps/rejected), plus spo/offset (mean offset) and spo/margin_accuracy (mean of h > 0)
    when an offset is given."""
    return metrics_from_sums(reward_metric_sums(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                offset))


# --- keeping earlier dimensions (--keep; docs/align.md) -------------------------------------------------------


def reweighted_offset(offset: Tensor, multipliers: Sequence[float], reward_margins: Sequence[Tensor]) -> Tensor:
    """The SPO offset with earlier dimensions' weights raised by Lagrange multipliers: offset + sum_i mu_i * Delta r_i.

    The offset is linear in the weights (`spo_offset_all`), so raising lambda_i^(n) by mu_i adds mu_i * Delta r_i,
    whatever mode produced `offset`: the per-pair margins are computed once and re-weighting costs one multiply-add
    per pair. `multipliers[j]` goes with `reward_margins[j]`. With every multiplier 0 it returns `offset` itself (the
    same tensor, not a recomputed one), so a slack constraint leaves the stage plain SPO bit for bit.
    """
    if len(multipliers) != len(reward_margins):
        raise ValueError(f"{len(multipliers)} multipliers for {len(reward_margins)} reward margins")
    if not any(multipliers):
        return offset
    return offset + spo_offset_all(multipliers, reward_margins)


def replay_loss(
    beta: float,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    prev_chosen: Tensor,
    prev_rejected: Tensor,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair replay loss [B] on an earlier dimension's own pairs, replayed during a later stage n: the stage's
    preference loss on h = beta_n * Delta(pi_theta, pi_{n-1}), with no offset.

    It protects the margin those pairs had under pi_{n-1}: at h = 0 (the margin unchanged) the sigmoid loss still
    pulls it up with slope 1/2, and the further it falls below pi_{n-1}'s the harder it pulls (slope -> 1). Weighted
    by the dimension's multiplier it is the Lagrangian's -lambda_i * E[R_i] term, estimated on R_i's own data --
    which is what still works when every new pair conflicts with the earlier dimension alike (an offset then lowers
    every new pair's weight alike, and Adam's scale invariance undoes a uniform down-weighting).
    """
    h = spo_logits(beta, policy_chosen, policy_rejected, prev_chosen, prev_rejected)
    return preference_loss(h, beta, loss_type, label_smoothing)
