"""Resuming a run: which saved configs are the same run."""
import json
import re

import pytest
import torch

from pipeline.core import checkpoint
from pipeline.core.config import DEFAULTS
from pipeline.core.errors import UserError


def test_a_key_added_after_the_run_started_counts_as_its_default():
    saved = json.dumps({"rect_steps": 50})  # saved before rect_init existed
    cfg = {"rect_steps": 50, "rect_init": DEFAULTS["rect_init"]}
    checkpoint.check_same_config(saved, cfg, ["rect_steps", "rect_init"], "run")
    with pytest.raises(UserError, match="rect_init"):
        checkpoint.check_same_config(saved, dict(cfg, rect_init="other/rnet"), ["rect_steps", "rect_init"], "run")


def test_a_changed_key_is_refused_with_its_two_values():
    saved = json.dumps({"rect_steps": 50})
    with pytest.raises(UserError, match="rect_steps=50, not 25"):
        checkpoint.check_same_config(saved, {"rect_steps": 25}, ["rect_steps"], "run")


@pytest.mark.parametrize("foreign,what", [
    ({"weight": torch.zeros(2)}, "its 'model' is missing"),  # a bare state_dict
    ({"step": 3}, "its 'model' is missing"),
    ([1, 2, 3], "it holds a list, not a dict"),
    ({"model": {}, "rng": {}, "step": 1, "config": "[1]", "record": "{}"}, "its 'config' is not a JSON object"),
    ({"model": {}, "rng": {}, "step": 1, "config": "{}", "record": "{oops"}, "its 'record' is not readable JSON"),
])
def test_a_foreign_checkpoint_is_one_sentence(tmp_path, foreign, what):
    """Issue 31: these were KeyError / TypeError tracebacks when a run resumed."""
    torch.save(foreign, tmp_path / checkpoint.LATEST)
    with pytest.raises(UserError, match=re.escape(f"is not a checkpoint of this tool ({what}")):
        checkpoint.load(tmp_path)
