"""A run config built in Python holds what Python code holds: paths, numpy numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from unpact.run.config import RunConfig


def test_numpy_and_torch_numbers_are_plain_numbers_at_any_depth():
    """`{"config": {"steps": np.int64(3)}}` under a method was kept as numpy's, and the run
    then failed writing config.yaml ("Unable to serialize unknown type: numpy.int64"), a
    traceback; a sweep over a numpy array likewise. Now every array value is the
    Python number (or list) the config file would hold, in the free mappings too."""
    built = RunConfig(
        model=Path("/models/tiny"),
        data={"benchmark": "news", "forget_items": np.int64(4)},
        inject={"settings": {"lr": np.float32(0.5), "max_epochs": torch.tensor(3)}},
        methods=[
            {"method": "ga", "config": {"steps": np.int64(3), "settings": {"k": np.arange(2)}}},
            {"method": "npo", "sweep": {"lr": np.array([1e-5, 2e-5, 3e-5])}},
        ],
        attacks=[{"name": "quantize", "settings": {"bits": np.int8(4)}}],
    )
    plain = RunConfig(
        model="/models/tiny",
        data={"benchmark": "news", "forget_items": 4},
        inject={"settings": {"lr": 0.5, "max_epochs": 3}},
        methods=[
            {"method": "ga", "config": {"steps": 3, "settings": {"k": [0, 1]}}},
            {"method": "npo", "sweep": {"lr": [1e-5, 2e-5, 3e-5]}},
        ],
        attacks=[{"name": "quantize", "settings": {"bits": 4}}],
    )
    assert built == plain
    dumped = built.model_dump(mode="json")
    assert yaml.safe_load(yaml.safe_dump(dumped)) == plain.model_dump(mode="json")
    names = [run.label for spec in built.methods for run in spec.expand()]
    assert names == ["ga", "npo[lr=1e-05]", "npo[lr=2e-05]", "npo[lr=3e-05]"]
    assert type(built.methods[0].config["steps"]) is int


def test_an_unlearning_and_an_injection_config_take_numpy_numbers():
    """`UnlearnConfig(settings={"beta": np.float64(0.2)})` (the Python API of `unlearn`)
    kept numpy's number and its config.yaml could not be written."""
    from unpact.inject import InjectConfig
    from unpact.unlearn.config import UnlearnConfig

    given = UnlearnConfig(method="npo", steps=np.int64(3), settings={"beta": np.float64(0.2)})
    assert given == UnlearnConfig(method="npo", steps=3, settings={"beta": 0.2})
    assert yaml.safe_dump(given.model_dump(mode="json"))
    assert type(given.settings["beta"]) is float
    taught = InjectConfig(lr=np.float32(0.25), max_epochs=np.int64(2))
    assert taught == InjectConfig(lr=0.25, max_epochs=2)
