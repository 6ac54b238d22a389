from __future__ import annotations

import itertools

import numpy as np
import pytest

from attn_search import hypervolume, pareto_front
from attn_search.search.pareto import knee_point, non_dominated_ranks, normalized_hypervolume

MAX_MIN = ["maximize", "minimize"]


def brute_front(points: np.ndarray, directions: list[str]) -> set[int]:
    signs = np.array([-1 if d == "maximize" else 1 for d in directions])
    p = points * signs
    return {
        i for i in range(len(p))
        if not any((p[j] <= p[i]).all() and (p[j] < p[i]).any() for j in range(len(p)) if j != i)
    }  # fmt: skip


def monte_carlo_free_hv(points: np.ndarray, ref: np.ndarray, directions: list[str]) -> float:
    """Independent exact computation: inclusion over a grid of all coordinate cuts."""
    signs = np.array([-1 if d == "maximize" else 1 for d in directions])
    p, r = points * signs, ref * signs
    p = p[(p < r).all(axis=1)]
    if len(p) == 0:
        return 0.0
    axes = [np.unique(np.append(p[:, k], r[k])) for k in range(p.shape[1])]
    total = 0.0
    for cell in itertools.product(*[range(len(a) - 1) for a in axes]):
        lo = np.array([axes[k][c] for k, c in enumerate(cell)])
        hi = np.array([axes[k][c + 1] for k, c in enumerate(cell)])
        if (p <= lo).all(axis=1).any():  # the cell lies in the dominated region
            total += float(np.prod(hi - lo))
    return total


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("m", [2, 3])
def test_front_and_hypervolume_match_brute_force(seed: int, m: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.random((25, m)).round(2)  # rounding makes ties and duplicates
    directions = ["maximize"] + ["minimize"] * (m - 1)
    assert set(pareto_front(points, directions).tolist()) == brute_front(points, directions)
    ref = np.array([0.0] + [1.1] * (m - 1))
    assert hypervolume(points, ref, directions) == pytest.approx(monte_carlo_free_hv(points, ref, directions), rel=1e-9)


def test_known_values() -> None:
    pts = [[0.9, 10.0], [0.5, 2.0], [0.4, 5.0]]
    assert pareto_front(pts, MAX_MIN).tolist() == [0, 1]
    # rectangles to ref (0, 12): (0.9 x 2) + (0.5 x 10) - overlap (0.5 x 2) = 1.8 + 5.0 - 1.0
    assert hypervolume(pts, [0.0, 12.0], MAX_MIN) == pytest.approx(5.8)
    assert non_dominated_ranks(pts, MAX_MIN).tolist() == [0, 0, 1]
    assert hypervolume([[0.5, 20.0]], [0.0, 12.0], MAX_MIN) == 0.0


def test_normalized_hypervolume_is_in_unit_range() -> None:
    pts = [[1.0, 1.0], [0.5, 0.0]]
    hv = normalized_hypervolume(pts, MAX_MIN, lower=[0, 0], upper=[1, 1])
    assert hv == pytest.approx(0.5)
    assert normalized_hypervolume([[1.0, 0.0]], MAX_MIN, lower=[0, 0], upper=[1, 1]) == pytest.approx(1.0)


def test_knee_is_the_bend_of_the_front() -> None:
    pts = [[0.2, 1.0], [0.8, 2.0], [0.85, 10.0], [0.9, 20.0]]
    assert knee_point(pts, MAX_MIN) == 1


def test_direction_errors() -> None:
    with pytest.raises(ValueError, match="direction 'up'"):
        pareto_front([[1, 2]], ["up", "minimize"])
    with pytest.raises(ValueError, match="2 objectives but 1 directions"):
        pareto_front([[1, 2]], ["maximize"])


def test_the_report_names_a_cheaper_point_within_the_knees_floor_instead_of_saying_there_is_none() -> None:
    """The knee of two points within its accuracy floor is the more accurate one; where that costs more
    than half of dense's and the other does not, the report names the other and the rule that picks it
    (a default search counting tiles: BigBird(32, 4, 3) 1.000 at 57%, BigBird(32, 3, 2) 0.988 at 47%)."""
    import dataclasses

    import pandas as pd

    from attn_search import AttentionConfig
    from attn_search.report.outputs import _dense_note, select_row
    from attn_search.search.space import load_space

    space = load_space("sparse")
    compute = space.metrics[1]
    front = pd.DataFrame({"trial": [11, 23, 18], "accuracy": [1.0, 0.988, 0.86],
                          compute: [1.258e9, 1035993088.4, 2.64e8], "state": "complete", "feasible": True})  # fmt: skip

    @dataclasses.dataclass
    class Outputs:
        select: str

        space = load_space("sparse")

        def dense_share(self, config: AttentionConfig, value: float, metric: str) -> tuple[float, int]:
            return value / 2.2e9, 4096

    best = front.iloc[0]
    note = _dense_note(Outputs("knee"), AttentionConfig(), best, front)  # type: ignore[arg-type]
    assert "costs 57% of dense attention's FLOPs over 128-tiles at L=4096" in note
    rule = "max-accuracy-under-attn_tile_flops=1035993088.4"  # (rounded to 10 digits it would leave trial 23 out)
    assert "Trial 23, within the selection's accuracy floor (accuracy 0.988), costs 47%" in note and rule in note
    assert "No configuration within" not in note
    assert int(select_row(front, space, rule)["trial"]) == 23  # type: ignore[index]
    # with the floor above 0.988 nothing cheaper qualifies, and it says so
    strict = _dense_note(Outputs("knee=0.99"), AttentionConfig(), best, front)  # type: ignore[arg-type]
    assert "No configuration within the selection's accuracy floor costs 50%" in strict and "Trial 23" not in strict
