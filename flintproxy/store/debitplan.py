"""The debit plan: what one usage batch charges, row by row, to leases and free money.

Shared mode (``store.leases``): each row is charged to its node's credit lease while
the lease exists, the rest only from the account's free money (``balance - leased``);
with spend caps (``store.cap_leases``) the same rule holds for each (key, period) pot
the row counts against. A row is charged at most what EVERY pot it touches covers
(its lease's unspent part plus the pot's free part), and what it cannot be charged
is written off and counted: a late row (its lease swept while its node could not
reach the database) never takes a balance below zero nor a key's spend above its
cap, nor what other nodes' leases hold. Pure: the callers lock and read the pots
first, in the usage writer's transaction, and apply the plan after. The cap pots
are those this node holds cap books for: a row admitted before its node heard that
a cap was set is charged in full (the window ``gate.capleases`` names).

The embedded SQLite writer uses the same rule with no leases (``store.ledger``): a
batch is charged at most what each balance holds, should money have left an account
where the process's ``Billing`` could not see it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flintproxy.store.cap_leases import Pot

__all__ = ["DebitPlan", "plan_debits"]


@dataclass(slots=True)
class DebitPlan:
    """What one usage batch charges: per row, per account and per lease."""

    costs: list[int]  # per row, in batch order: the cost actually charged
    charges: dict[int, int] = field(default_factory=dict)  # account -> charged
    from_leases: dict[int, int] = field(default_factory=dict)  # account -> of it, leased
    spends: dict[int, int] = field(default_factory=dict)  # lease -> spent
    written_off: int = 0  # nano the rows cost but no lease nor free money covered
    cap_spends: dict[int, int] = field(default_factory=dict)  # cap lease -> spent
    cap_from_leases: dict[Pot, int] = field(default_factory=dict)  # pot -> of it, leased


def plan_debits(rows: Sequence[tuple[int, int, int | None]], free: Mapping[int, int],
                leases: Mapping[int, tuple[int, int]],
                pots: Sequence[Sequence[tuple[Pot, int | None]]] = (),
                pot_free: Mapping[Pot, int | None] | None = None,
                pot_leases: Mapping[int, tuple[Pot, int]] | None = None) -> DebitPlan:
    """Charge each ``(account, cost, lease or None)`` row; see the module docstring.

    A row is charged to its lease while the lease exists and covers it; the rest
    (a late row, or a lease that cannot cover it) only from the account's free
    money. The total charged never exceeds what the leases and free money hold.

    Spend caps (``store.cap_leases``): ``pots[i]`` names row i's capped pots, each
    with the cap lease its node charges it to; ``pot_free`` is each pot's free part
    (None: not capped), ``pot_leases`` each live cap lease's ``(pot, unspent)``. A
    row is charged at most what EVERY pot it touches covers (its lease's unspent part
    plus the pot's free part), so neither a balance nor a cap is ever exceeded.
    """
    free = dict(free)
    left = {lease: unspent for lease, (_acct, unspent) in leases.items()}
    owner = {lease: acct for lease, (acct, _u) in leases.items()}
    pfree = dict(pot_free or {})
    cap_left = {lease: unspent for lease, (_pot, unspent) in (pot_leases or {}).items()}
    cap_owner = {lease: pot for lease, (pot, _u) in (pot_leases or {}).items()}
    plan = DebitPlan(costs=[])
    for i, (account_id, cost, lease_id) in enumerate(rows):
        leased = 0
        if lease_id is not None and owner.get(lease_id) == account_id:
            leased = left[lease_id]
        charged = min(cost, leased + max(free.get(account_id, 0), 0))
        row_pots = pots[i] if i < len(pots) else ()
        for pot, cap_lease in row_pots:
            room = pfree.get(pot)
            if room is not None:
                held = cap_left[cap_lease] if cap_lease is not None and \
                    cap_owner.get(cap_lease) == pot else 0
                charged = min(charged, held + max(room, 0))
        from_lease = min(charged, leased)
        if from_lease:
            assert lease_id is not None
            left[lease_id] -= from_lease
            plan.spends[lease_id] = plan.spends.get(lease_id, 0) + from_lease
            plan.from_leases[account_id] = plan.from_leases.get(account_id, 0) + from_lease
        if charged - from_lease:
            free[account_id] -= charged - from_lease
        for pot, cap_lease in row_pots:
            from_cap = 0
            if cap_lease is not None and cap_owner.get(cap_lease) == pot:
                from_cap = min(charged, cap_left[cap_lease])
            if from_cap:
                assert cap_lease is not None
                cap_left[cap_lease] -= from_cap
                plan.cap_spends[cap_lease] = plan.cap_spends.get(cap_lease, 0) + from_cap
                plan.cap_from_leases[pot] = plan.cap_from_leases.get(pot, 0) + from_cap
            room = pfree.get(pot)
            if room is not None:
                pfree[pot] = room - (charged - from_cap)
        plan.written_off += cost - charged
        plan.costs.append(charged)
        plan.charges[account_id] = plan.charges.get(account_id, 0) + charged
    return plan
