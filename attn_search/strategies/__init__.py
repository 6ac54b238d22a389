"""How the next configuration is chosen: strategies behind one ask/tell interface.

A strategy speaks in values: ``ask() -> values | None``, ``tell(values, outcome)``
(:class:`~attn_search.strategies.base.Strategy`). Optuna samplers (one adapter,
:mod:`~attn_search.strategies.samplers`), the candidate policy (:mod:`~attn_search.strategies.candidates`,
with its learned first configurations, :mod:`~attn_search.strategies.head`) and the SB3 grid
agents (:mod:`~attn_search.strategies.agent`, imported only when used) are interchangeable: the
search loop drives any of them on any backend. A new strategy is a class with the
:class:`~attn_search.strategies.base.Strategy` methods and one line in :func:`make_strategy`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attn_search.engine import metrics as M
from attn_search.search.space import SearchSpace
from attn_search.strategies.base import Strategy, StrategyContext
from attn_search.strategies.samplers import OPTUNA_STRATEGIES, SINGLE_OBJECTIVE_ONLY, SamplerStrategy, make_sampler

AGENT_STRATEGIES = ("ppo-grid", "a2c")
"""Agents that act on one space's grid and learn within a search (:mod:`~attn_search.strategies.agent`)."""
POLICY_STRATEGY = "ppo"
"""The meta-trained candidate policy (:mod:`~attn_search.strategies.candidates`): any space."""
HEAD_GP_STRATEGY = "portfolio+gp"
"""The shipped policy's learned first configurations for the length and measure the search counts
compute in (:mod:`~attn_search.strategies.head`), then Optuna's GP sampler: the family-out
benchmark's ``portfolio+gp`` (README, "Which strategy should I use?": with compute in 128-tiles at
L=4096, as the sparse space counts it, the best mean rank at 10 trials of the strategies a search
can run)."""
PORTFOLIO_STRATEGY = "portfolio"
"""The shipped zero-shot portfolio: the :data:`~attn_search.strategies.head.PORTFOLIO_SIZE`
configurations learned to cover the shipped tables' fronts together, for the length and measure the
search counts compute in, then Optuna's TPE sampler (the default) once they are spent: the
family-out benchmark's ``portfolio`` (README, "Which strategy should I use?": on all four sealed
sets the best at 10 trials with compute at the task's length; at L=4096 with FLOPs it led on the
first, third and fourth sets and was among the worst on the second, where GP or TPE led)."""
STRATEGIES = (*OPTUNA_STRATEGIES, POLICY_STRATEGY, HEAD_GP_STRATEGY, PORTFOLIO_STRATEGY, *AGENT_STRATEGIES)

__all__ = [
    "AGENT_STRATEGIES",
    "HEAD_GP_STRATEGY",
    "OPTUNA_STRATEGIES",
    "POLICY_STRATEGY",
    "PORTFOLIO_STRATEGY",
    "SINGLE_OBJECTIVE_ONLY",
    "STRATEGIES",
    "SamplerStrategy",
    "Strategy",
    "StrategyContext",
    "check_strategy",
    "make_sampler",
    "make_strategy",
]


def check_strategy(
    name: str, space: SearchSpace, *, evaluator: str, constrained: bool, options: dict[str, Any]
) -> None:
    """Refuse a strategy that cannot serve this search (``ValueError`` saying what to change)."""
    if name not in STRATEGIES:
        raise ValueError(f"--strategy {name!r} is unknown: use one of {', '.join(STRATEGIES)}")
    if name == POLICY_STRATEGY:
        if options.get("pretrain"):
            raise ValueError("--pretrain applies to --strategy ppo-grid or a2c (ppo is meta-trained: make agent)")
        if len(space.objectives) < 2:
            raise ValueError(f"--strategy {name} rewards front hypervolume: it needs a compute objective")
        if constrained:
            raise ValueError(f"--strategy {name} cannot honour --max-flops/--max-latency-ms: use tpe, nsga2 or gp")
        if not evaluator.startswith("table:") and space.metrics[1] not in M.ANALYTIC:  # (a table's is looked up)
            raise ValueError(
                f"--strategy {name} weighs candidates by analytic FLOPs: it needs --compute flops, attn_flops or attn_tile_flops"
            )
        agent = options.get("agent")
        if agent and agent != "none" and not Path(agent).is_file():
            raise ValueError(f"--agent {agent!r}: no such file (a policy saved by meta-training, or none)")
        return
    if (options.get("pretrain") or options.get("agent")) and name not in AGENT_STRATEGIES:
        raise ValueError("--pretrain and --agent apply to --strategy ppo, ppo-grid or a2c")
    agent = options.get("agent")
    if agent and agent != "none":
        from attn_search.strategies.agent import agent_info, grid_for

        if not Path(agent).is_file():
            raise ValueError(f"--agent {agent!r}: no such file (an SB3 .zip, or none to train from scratch)")
        info = agent_info(agent)
        if info is not None and grid_for(space, info) is None:
            raise ValueError(f"--agent {agent} was meta-trained on other parameters ({', '.join(info.get('grid', {}))}) "
                             f"than this space's: use it with --space {info.get('space')}, or drop --agent")  # fmt: skip
    if name in AGENT_STRATEGIES:
        if len(space.objectives) < 2:
            raise ValueError(f"--strategy {name} rewards front hypervolume: it needs a compute objective")
        if constrained:
            raise ValueError(f"--strategy {name} cannot honour --max-flops/--max-latency-ms: use tpe, nsga2 or gp")
        if not options.get("pretrain") and evaluator == "training" and space.metrics[1] not in (*M.ANALYTIC, M.PARAMS):
            raise ValueError(
                f"--strategy {name} needs --compute flops, attn_flops, attn_tile_flops or params (or --pretrain TABLE)"
            )
        return
    sampler = {HEAD_GP_STRATEGY: "gp", PORTFOLIO_STRATEGY: "tpe"}.get(name, name)
    make_sampler(sampler, seed=0, n_objectives=len(space.objectives), n_trials=10, constrained=constrained)


def make_strategy(name: str, context: StrategyContext, *, constrained: bool = False) -> Strategy:
    """The strategy called ``name`` (see :data:`STRATEGIES`)."""
    if name in OPTUNA_STRATEGIES:
        return SamplerStrategy(name, context, constrained=constrained)
    if name == POLICY_STRATEGY:
        from attn_search.strategies.candidates import CandidateStrategy
        from attn_search.strategies.head import HeadFirst, stored_head

        policy = CandidateStrategy(context)
        # the learned first configurations: given (the benchmark passes the held-out family's), or
        # the ones stored beside the policy for the length and measure the search counts compute
        # in (head.head_length); "none" or an agent without any: the policy alone
        head = context.options.get("head")
        if head is None:
            head = stored_head(policy.info, context.space, policy.seq_len)
        return HeadFirst(policy, head, context.space) if head and head != "none" else policy
    if name in (HEAD_GP_STRATEGY, PORTFOLIO_STRATEGY):
        from attn_search.strategies.candidates import SHIPPED, provenance, searched_task
        from attn_search.strategies.head import HEAD_SIZE, HeadFirst, stored_head

        # learned on the shipped tables (make agent), for the length and measure the search counts
        # compute in: its first few then GP, or all of it then TPE
        gp = name == HEAD_GP_STRATEGY
        head = stored_head(provenance(SHIPPED), context.space, searched_task(context).seq_len,
                           size=HEAD_SIZE if gp else None)  # fmt: skip
        inner = SamplerStrategy("gp" if gp else "tpe", context, constrained=constrained)
        # (their trials say they came from the learned list, then from the sampler: "portfolio", then "gp" or "tpe")
        return HeadFirst(inner, head, context.space, name=name, then=f"Optuna's {'GP' if gp else 'TPE'} sampler",
                         label=PORTFOLIO_STRATEGY)  # fmt: skip
    if name in AGENT_STRATEGIES:
        from attn_search.strategies.agent import AgentStrategy

        return AgentStrategy(name, context)
    raise ValueError(f"--strategy {name!r} is unknown: use one of {', '.join(STRATEGIES)}")
