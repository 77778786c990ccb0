"""The optional loss terms on the gate's scalings: load balance and entropy.

Terms on the scalings `s` `(B, T, L, E)` for the gate trainer (`loramix.training.gate`), for
gates that collapse onto one expert (both off by default). With `m` the attention mask `(B, T)`
and `N = sum(m)` real tokens:

    usage     p[l, e] = sum_{b,t} m[b,t] s[b,t,l,e] / N                      (L, E)
    balance   mean_l CV^2(p[l, :]) = mean_l ( E * sum_e p[l,e]^2 / (sum_e p[l,e])^2 - 1 )
              0 when every expert is used equally, E - 1 when one expert takes all.
    entropy   mean over real tokens and l of KL(s[b,t,l,:] || uniform)
              = log E - H(s[b,t,l,:]); 0 for uniform scalings, log E for one-hot ones.

    loss = cross_entropy + balance_weight * balance + entropy_weight * entropy

`balance_weight > 0` spreads the experts' average use without forbidding confident per-token
choices. `entropy_weight > 0` pulls every token's scalings toward uniform; `< 0` sharpens
them (with a positive balance weight: confident per-token choices, spread over all experts,
much like maximising the mutual information of tokens and experts). Both need the softmax
(`enable_softmax=True`). Under data parallelism each process computes the terms on its own
batch; the gradients are then averaged like the loss's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loramix.checks import is_finite, raise_problems
from loramix.config import XLoraConfig


@dataclass(frozen=True)
class GateRegularizer:
    """Weights of the optional loss terms on the scalings (see the module docstring).

    Attributes:
        balance_weight: Weight of the load-balancing term (CV^2 of mean expert usage); >= 0.
        entropy_weight: Weight of the per-token KL-from-uniform term; > 0 spreads each token's
            scalings, < 0 sharpens them.
    """

    balance_weight: float = 0.0
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not (is_finite(self.balance_weight) and self.balance_weight >= 0):
            problems.append(
                f"balance_weight={self.balance_weight!r}: use a number >= 0 (0 turns it off; "
                "0.01 to 0.1 is typical)."
            )
        if not is_finite(self.entropy_weight):
            problems.append(
                f"entropy_weight={self.entropy_weight!r}: use a finite number (0 turns it off)."
            )
        raise_problems("Invalid GateRegularizer", problems)

    @property
    def active(self) -> bool:
        return self.balance_weight != 0 or self.entropy_weight != 0

    def check(self, config: XLoraConfig) -> None:
        """Raise if a term is on but the scalings are not a softmax over experts."""
        if self.active and not config.enable_softmax:
            raise ValueError(
                "balance_weight and entropy_weight act on the softmax over experts, but "
                "enable_softmax=False (--no-softmax); enable the softmax or set both weights to 0."
            )


def scaling_terms(
    scalings: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The balance and entropy terms of the module docstring, over real tokens.

    Args:
        scalings: `(B, T, L, E)` gate output after the softmax.
        attention_mask: `(B, T)`, 1 for real tokens; None counts every token.

    Returns:
        `(balance, entropy)`, two scalars that carry gradients to the gate.
    """
    batch, tokens, _, n_experts = scalings.shape
    if attention_mask is None:
        mask = scalings.new_ones(batch, tokens)
    else:
        mask = attention_mask[:, -tokens:].to(scalings.dtype)  # (B, T)
    weights = mask[:, :, None, None]  # (B, T, 1, 1)
    n_tokens = mask.sum().clamp_min(1)
    usage = (scalings * weights).sum(dim=(0, 1)) / n_tokens  # (L, E)
    cv2 = n_experts * usage.square().sum(-1) / usage.sum(-1).square().clamp_min(1e-12) - 1  # (L,)
    balance = cv2.mean()
    neg_entropy = torch.special.xlogy(scalings, scalings).sum(-1)  # (B, T, L)
    kl_uniform = neg_entropy + math.log(n_experts)  # (B, T, L)
    entropy = (kl_uniform * mask[:, :, None]).sum() / (n_tokens * scalings.shape[2])
    return balance, entropy
