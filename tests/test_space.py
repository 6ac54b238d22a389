from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from attn_search import load_space
from attn_search.search.space import BUILTIN_SPACES, SpaceError, parse_space

TINY = Path(__file__).parent / "data" / "tiny.yaml"


@pytest.mark.parametrize("name", BUILTIN_SPACES)
def test_builtin_spaces_load_and_make_valid_configs(name: str) -> None:
    space = load_space(name)
    study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        config = space.make_config(space.suggest(trial))
        study.tell(trial, [0.0] * len(space.directions))
        for key, value in space.fixed.items():
            assert getattr(config, key) == value


def test_conditional_params_appear_only_when_active() -> None:
    space = load_space("sparse")
    study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        values = space.suggest(trial)
        study.tell(trial, [0.0, 0.0])
        seen.add(values["pattern"])
        assert ("window" in values) == (values["pattern"] in ("window", "dilated", "longformer"))
        assert ("dilation" in values) == (values["pattern"] == "dilated")
        assert ("n_random" in values) == (values["pattern"] == "bigbird")
    assert len(seen) == 6


def test_round_trip_and_fingerprint() -> None:
    space = load_space(TINY)
    again = parse_space(space.to_dict(), source="copy")
    assert again.fingerprint() == space.fingerprint()
    assert space.with_compute("latency").fingerprint() != space.fingerprint()
    assert space.with_compute("latency").metrics == ["accuracy", "latency_ms"]
    assert space.with_compute(None).metrics == ["accuracy"]


def _bad(tmp_path: Path, mutate: dict, drop: str | None = None) -> str:
    data = yaml.safe_load(TINY.read_text())
    if drop:
        del data[drop]
    for dotted, value in mutate.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpaceError) as exc:
        load_space(path)
    message = str(exc.value)
    assert message.startswith(str(path)) and "\n" not in message
    return message


@pytest.mark.parametrize(
    "mutate,expected",
    [
        ({"params.lr.type": "number"}, "params.lr.type: 'number' is unknown; use int, float or categorical"),
        ({"params.lr.low": 0.5}, "params.lr: low=0.5 must be below high"),
        ({"params.lr.log": True, "params.lr.low": 0}, "params.lr.log: a log-scaled parameter needs low > 0"),
        ({"params.window.when": {"heads": "x"}}, "params.window.when.heads: must name a parameter defined before"),
        ({"params.window.when": {"pattern": "diagonal"}}, "'diagonal' is not one of pattern's choices"),
        ({"params.n_heads.choices": [3]}, "params.n_heads: value 3 gives an invalid config: n_heads=3 does not divide"),
        ({"params.widht": {"type": "int", "low": 1, "high": 2}}, "params.widht: not an AttentionConfig field"),
        ({"objectives": {"accuracy": "maximize", "speed": "minimize"}}, "objectives.speed: unknown metric"),
        ({"fixed.d_model": 15}, "fixed: n_heads=4 does not divide d_model=15"),
        ({"task": {"name": "imagenet"}}, "task: task 'imagenet' is unknown"),
        ({"colour": 1}, "colour: unknown key"),
        ({"params.lr.scale": "log"}, "params.lr.scale: unknown key"),
    ],
)
def test_malformed_spaces_name_file_key_and_why(tmp_path: Path, mutate: dict, expected: str) -> None:
    assert expected in _bad(tmp_path, mutate)


def test_unparsable_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("params: [unclosed\n")
    with pytest.raises(SpaceError, match=r"broken\.yaml: not valid YAML"):
        load_space(broken)
    with pytest.raises(SpaceError, match="no such file"):
        load_space(tmp_path / "missing.yaml")
    with pytest.raises(SpaceError, match="neither a built-in space"):
        load_space("sparsest")


@pytest.mark.slow  # 17 s on 2 cores: keeps `make test` under 10 minutes
def test_the_sparse_space_counts_compute_at_the_length_a_model_is_deployed() -> None:
    """At the task's length (256) the sparse space's FLOPs span 1.3x, so a front would rank patterns
    by accuracy alone; the space counts compute at 4096, where they span more than 5x."""
    import dataclasses

    from attn_search.search.evaluators import make_evaluator

    space = load_space("sparse")
    assert space.target_len == 4096

    def span(s: Any) -> float:
        evaluator = make_evaluator("training", s, task=s.task, task_kwargs=dict(s.task_params))
        lo, hi = evaluator.bounds(s, "flops", evaluator.grids(s, 5))
        return hi / lo

    assert span(space) > 5 and span(dataclasses.replace(space, target_len=None)) < 1.4
