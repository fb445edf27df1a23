"""``LinearForm``: a linear function of the plan's decision literals (c, k, z, sel), in model units
(a memory row) or nanoseconds (a cost). cpsat.py writes its rows and objective in it; bound.py and
primal.py read them without CP-SAT.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class LinearForm:
    """A linear function of the decision literals, in model units (bytes) or nanoseconds (cost)."""

    c: dict[int, int]  # region -> coefficient of c[region]
    k: dict[tuple[int, int], int]  # (region, op) -> coefficient of k[region, op]
    z: dict[tuple[int, int, int, bool], int]  # (region, op, holder region, op is forced) -> coefficient of z
    constant: int = 0
    # region -> coefficient of sel[region]: 1 iff it caches any op (selective checkpointing's dispatch
    # modes); costs only, never a memory row
    s: dict[int, int] = field(default_factory=dict)
    # (coefficient, regions): paid once when any of the regions is checkpointed (Region.shared); costs
    # only. The row bounds here do not see them: ``spread`` charges each region its share instead
    shared: tuple[tuple[int, tuple[int, ...]], ...] = ()

    def value(self, saved: dict[int, frozenset[int]]) -> int:
        """The form's value for a plan without z terms (a cost): ``saved`` maps each checkpointed region to
        the ops it caches."""
        return (
            self.constant
            + sum(a for j, a in self.c.items() if j in saved)
            + sum(a for (j, p), a in self.k.items() if j in saved and p in saved[j])
            + sum(a for j, a in self.s.items() if saved.get(j))
            + sum(a for a, members in self.shared if any(j in saved for j in members))
        )

    def spread(self) -> "LinearForm":
        """The form with each shared cost split evenly over its regions' c (rounded down), never above
        the form on any plan (all of a group's regions on pay the whole cost, fewer pay less): what the
        row bounds, which see regions one by one, minimise for a valid lower bound."""
        if not self.shared:
            return self
        c = dict(self.c)
        for a, members in self.shared:
            for j in members:
                c[j] = c.get(j, 0) + a // len(members)
        return LinearForm(c=c, k=self.k, z=self.z, constant=self.constant, s=self.s)


__all__ = ["LinearForm"]
