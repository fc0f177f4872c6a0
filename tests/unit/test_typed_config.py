"""Unit tests for lm_core.typed_config: build() rejects bad input with messages that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from lm_core.typed_config import ConfigError, build, flatten, to_dict


@dataclass
class Source:
    kind: Literal["a", "b"] = "a"
    path: str | None = None
    weight: float = 1.0


@dataclass
class Optim:
    lr: float = 1e-3
    steps: int = 10
    fused: bool = False

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"optim.steps={self.steps} must be >= 1")


@dataclass
class Root:
    name: str = "x"
    optim: Optim = field(default_factory=Optim)
    sources: list[Source] = field(default_factory=lambda: [Source()])
    tags: list[str] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)
    limit: int | None = None


def test_build_nested_dataclasses_and_lists():
    cfg = build(Root, {"name": "run", "optim": {"lr": 2, "steps": 3}, "sources": [{"kind": "b", "path": "/p"}, {}],
                       "tags": ["t"], "extra": {"k": 1}, "limit": None})
    assert cfg.optim == Optim(lr=2.0, steps=3)
    assert isinstance(cfg.optim.lr, float)  # an int where a float is expected is widened
    assert cfg.sources == [Source(kind="b", path="/p"), Source()]
    assert cfg.tags == ["t"] and cfg.extra == {"k": 1} and cfg.limit is None


def test_build_none_gives_defaults():
    assert build(Root, None) == Root()


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.stepz'; did you mean 'optim\.steps'\?"):
        build(Root, {"optim": {"stepz": 3}})


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(ConfigError) as err:
        build(Root, {"optim": {"qqqqqq": 3}})
    assert "'optim.qqqqqq'" in str(err.value)
    assert "known keys: fused, lr, steps" in str(err.value)


def test_unknown_key_inside_list_item_names_the_index():
    with pytest.raises(ConfigError, match=r"'sources\[1\]\.pth'; did you mean 'sources\[1\]\.path'"):
        build(Root, {"sources": [{}, {"pth": "/x"}]})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optim": {"steps": "abc"}}, "optim.steps must be an integer, got str 'abc'"),
        ({"optim": {"steps": True}}, "optim.steps must be an integer, got bool True"),
        ({"optim": {"steps": 2.5}}, "optim.steps must be an integer, got float 2.5"),
        ({"optim": {"lr": "fast"}}, "optim.lr must be a number, got str 'fast'"),
        ({"optim": {"lr": False}}, "optim.lr must be a number, got bool False"),
        ({"optim": {"fused": 1}}, "optim.fused must be true or false, got 1"),
        ({"name": 5}, "name must be a string, got int 5"),
        ({"limit": "many"}, "limit must be an integer, got str 'many'"),
        ({"tags": "t"}, "tags must be a list, got str 't'"),
        ({"tags": ["ok", 3]}, "tags[1] must be a string, got int 3"),
        ({"extra": [1]}, "extra must be a mapping, got list [1]"),
        ({"optim": 3}, "optim must be a mapping, got int 3"),
        ({"sources": [{"weight": "heavy"}]}, "sources[0].weight must be a number, got str 'heavy'"),
    ],
)
def test_wrong_type_names_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        build(Root, data)
    assert message in str(err.value)


def test_literal_not_allowed_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        build(Root, {"sources": [{"kind": "c"}]})
    assert str(err.value) == "sources[0].kind='c' is not allowed; choose one of 'a', 'b'"


def test_validate_runs_on_nested_configs():
    with pytest.raises(ValueError, match=r"optim\.steps=0 must be >= 1"):
        build(Root, {"optim": {"steps": 0}})


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="config must be a mapping"):
        build(Root, ["not", "a", "dict"])


def test_to_dict_round_trips_through_build():
    cfg = build(Root, {"optim": {"lr": 0.5, "fused": True}, "sources": [{"kind": "b"}, {"path": "/d"}], "limit": 4})
    data = to_dict(cfg)
    assert data["sources"] == [{"kind": "b", "path": None, "weight": 1.0}, {"kind": "a", "path": "/d", "weight": 1.0}]
    assert build(Root, data) == cfg


def test_flatten_dotted_keys_and_unflatten_round_trip():
    cfg = Root(optim=Optim(lr=0.25), tags=["x", "y"])
    data = to_dict(cfg)
    flat = flatten(data)
    assert flat["optim.lr"] == 0.25 and flat["optim.steps"] == 10 and flat["name"] == "x"
    assert flat["tags"] == ["x", "y"]  # lists stay values
    assert flat["sources"] == [{"kind": "a", "path": None, "weight": 1.0}]
    assert not any(isinstance(v, dict) and v for v in flat.values())

    nested: dict = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    # an empty mapping has no leaves, so it leaves no key behind; its default brings it back
    assert "extra" not in flat
    assert nested == {k: v for k, v in data.items() if k != "extra"}
    assert build(Root, nested) == cfg
