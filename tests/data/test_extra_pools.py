"""Extra unlabeled pools and the run-time contamination guard (issue #18), Ray-free parts."""

from __future__ import annotations

import pytest

from multimix.config import ConfigError, load_config


# ---------------------------------------------------------------------------------------------
# config keys


def test_extra_pool_keys_default_and_round_trip():
    cfg = load_config("cpu-small")
    assert cfg.data.unlabeled_data == [] and cfg.data.unlabeled_weights is None
    assert cfg.data.eval_data == [] and cfg.data.contamination_guard is True
    cfg = load_config("cpu-small", ["data.unlabeled_data=[/a, s3://b/c]",
                                    "data.unlabeled_weights=[1, 0.5, 2]",
                                    "data.unlabeled_seg_from=s3://b/c"])
    assert cfg.data.unlabeled_data == ["/a", "s3://b/c"]
    assert cfg.data.unlabeled_weights == [1.0, 0.5, 2.0]
    assert load_config(cfg.to_dict()).data == cfg.data


@pytest.mark.parametrize("sets, message", [
    (["data.unlabeled_data=/a"], "data.unlabeled_data: expected a list of str"),
    (["data.unlabeled_data=[/a, 3]"], "data.unlabeled_data[1]: expected a string"),
    (["data.unlabeled_data=[/a, /a]"], "data.unlabeled_data: lists /a twice"),
    (["data.cls_data=/c", "data.unlabeled_data=[/c/]"], "data.unlabeled_data[0]: is data.cls"),
    (["data.unlabeled_data=[/a]", "data.unlabeled_weights=[1]"],
     "data.unlabeled_weights: needs 2 weights"),
    (["data.unlabeled_data=[/a]", "data.unlabeled_weights=[0, 0]"],
     "data.unlabeled_weights: must be >= 0 and not all 0"),
    (["data.unlabeled_data=[/a]", "data.unlabeled_weights=[1, -1]"],
     "data.unlabeled_weights: must be >= 0"),
    (["data.unlabeled_seg_from=extra"], "data.unlabeled_seg_from: needs data.unlabeled_data"),
    (["data.unlabeled_data=[/a]", "data.unlabeled_seg_from=/b"],
     "data.unlabeled_seg_from: must be one of cls, seg, extra, cls+extra or a URI"),
    (["data.near_threshold=64"], "data.near_threshold: must be in [0, 63]"),
    (["data.eval_data=['']"], "data.eval_data[0]: must be a dataset URI"),
    (["data.contamination_guard=1"], "data.contamination_guard: expected true or false"),
])
def test_extra_pool_keys_refused_with_one_line_naming_the_key(sets, message):
    with pytest.raises(ConfigError) as info:
        load_config("cpu-small", sets)
    assert message in str(info.value) and "\n" not in str(info.value)
