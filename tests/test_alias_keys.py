"""A key written by its field's alias is refused, and the refusal names the field.

Keys are the fields' names in every layer (the README's promise); a schema with
``Field(alias="warmupSteps")`` made users write the alias, which was refused as "not a
key of the schema" with nothing to say which key to write instead.
"""

from __future__ import annotations

import pytest
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from hotknob.config import InvalidChange, merge_layers
from hotknob.config.merge import DEFAULT_PRECEDENCE
from hotknob.config.schema import by_field_names
from hotknob.config.sources import Layer, defaults_layer


class Sched(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    warmup_steps: int = Field(10, alias="warmupSteps")
    decay: float = Field(0.5, validation_alias=AliasChoices("decay_rate", "gamma"))


class Aliased(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    sched: Sched = Field(default_factory=Sched, alias="Schedule")
    seed: int = 0


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("sched.warmupSteps", "sched.warmup_steps"),
        ("sched.gamma", "sched.decay"),
        ("Schedule.decay_rate", "sched.decay"),
        ("Schedule", "sched"),
        ("sched.warmup_steps", None),  # the name itself: no alias in it
        ("sched.nope", None),
        ("seed.x", None),
    ],
)
def test_by_field_names_reads_each_alias_as_its_field(key: str, named: str | None) -> None:
    assert by_field_names(Aliased, key) == named


def test_a_layer_that_sets_an_alias_is_told_the_fields_name() -> None:
    layers = [defaults_layer(Aliased), Layer("etcd", {"sched.warmupSteps": 5}, {})]
    with pytest.raises(InvalidChange) as refused:
        merge_layers(Aliased, layers, DEFAULT_PRECEDENCE)
    (problem,) = refused.value.problems
    assert problem.key == "sched.warmupSteps" and problem.layer == "etcd"
    assert "an alias of sched.warmup_steps" in problem.reason
    assert "write sched.warmup_steps" in problem.reason
    # By its name, the same value is taken.
    layers[1] = Layer("etcd", {"sched.warmup_steps": 5}, {})
    assert merge_layers(Aliased, layers, DEFAULT_PRECEDENCE).flat["sched.warmup_steps"] == 5
