"""The uncertainty of an ensemble (fold models of one trainer, or prediction folders of several trainers).

Each member m gives class probabilities p_m (C, *spatial) and a per-pixel spread u_m: the guided heads'
uncertainty map, a standard deviation (``nndiffseg.guided.fusion``: the spread across samples of each class
probability, averaged over classes, or the total that adds the prior's own variance to it), 0 for a member
that does not sample (nnU-Net's trainers). The ensemble's spread treats the samples of all members as one
set, so the spread across members adds to the spread within them (the law of total variance), per class c:

    spread = mean_c sqrt( mean_m u_m^2 + var_m p_m,c )

where a member's probabilities stand for the mean of its samples. It is exact for two classes with mean fusion
(then each class has the same standard deviation u_m); for more classes u_m^2 stands in for every class's
variance. With one member it is that member's u; members that agree add nothing; members that disagree add
even when none of them samples. Running sums keep the memory at three arrays whatever the number of members."""
from typing import Optional

import torch


class PooledSpread:
    def __init__(self) -> None:
        self.members = 0
        self._p = self._p2 = self._u2 = None  # sums of p, p^2 (per class) and u^2

    def add(self, probabilities: torch.Tensor, spread: Optional[torch.Tensor] = None) -> None:
        """One member: probabilities (C, *spatial), spread (*spatial) or None for a member that does not sample."""
        p = probabilities.double()
        u2 = torch.zeros_like(p[0]) if spread is None else spread.double().reshape(p.shape[1:]) ** 2
        if self.members == 0:
            self._p, self._p2, self._u2 = p.clone(), p * p, u2.clone()
        else:
            if p.shape != self._p.shape:
                raise ValueError(f"member probabilities of shape {tuple(p.shape)}, earlier ones {tuple(self._p.shape)}")
            self._p += p
            self._p2 += p * p
            self._u2 += u2
        self.members += 1

    def spread(self) -> torch.Tensor:
        """(*spatial) float32: the pooled spread of every member added so far."""
        if self.members == 0:
            raise ValueError("no member added")
        n = self.members
        between = (self._p2 / n - (self._p / n) ** 2).clamp_min(0)  # per class; rounding may dip below 0
        return (self._u2[None] / n + between).sqrt().mean(dim=0).float()
