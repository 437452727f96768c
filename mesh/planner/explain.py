"""Why a candidate lost: one short phrase per candidate, for ``mesh plan``."""

from __future__ import annotations

from mesh.planner.model import Decision, Rank, Scored
from mesh.planner.policy import POLICIES

__all__ = ["why_not"]

#: How a loser that ties with the winner is described, per rank.
_TIES_ON = {Rank.COST: "cheapest", Rank.ACCURACY: "most-accurate", Rank.LATENCY: "fastest"}


def why_not(decision: Decision, s: Scored) -> str:
    """Why ``s`` is not the decision's winner ("" for the winner itself).

    Losers are explained by the rank of the decision's policy (cost for a
    policy that is no longer registered).
    """
    c = s.candidate
    if (c.node, c.variant) == (decision.node, decision.variant):
        return ""
    if not s.feasible:
        return "; ".join(s.problems)
    if not decision.feasible:
        return "feasible, but the chosen one was forced"  # cannot happen: kept for honesty
    total, best_total = s.prediction.total_ms, decision.prediction.total_ms
    held = POLICIES.get(decision.policy)
    rank = Rank.COST if held is None else held.rank
    policy = _TIES_ON[rank]
    if rank is Rank.COST and s.cost_per_1k > decision.cost_per_1k * 1.0001:
        return f"costs {s.cost_per_1k / max(decision.cost_per_1k, 1e-15):.2f}x the winner"
    if rank is Rank.ACCURACY and c.accuracy < decision.accuracy - 1e-9:
        return f"less accurate ({c.accuracy:.4f} < {decision.accuracy:.4f})"
    if rank is Rank.LATENCY and total > best_total + 1e-9:
        return f"slower by {total - best_total:.2f} ms"
    if decision.runner_up == f"{c.node}/{c.variant}":
        return "lost the power-of-two draw (more loaded)"
    if total > best_total + 1e-9:
        return f"ties on {policy} but {total - best_total:.2f} ms slower"
    if s.cost_per_1k > decision.cost_per_1k * 1.0001:
        return f"ties on {policy} but costs {s.cost_per_1k / max(decision.cost_per_1k, 1e-15):.2f}x"
    return "equivalent; not drawn this time"
