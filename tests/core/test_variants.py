"""The one variant → streams table (multimix.variants) and the modules that read it."""

from __future__ import annotations

import pytest

from multimix import variants as V
from multimix.config import VARIANTS, DataConfig

# the paper's table, written out once here: what each variant consumes
EXPECTED = {
    "unet": ("seg",),
    "enc": ("cls",),
    "enc-ssl": ("cls", "weak", "strong"),
    "umtl": ("cls", "seg"),
    "umtl-s": ("cls", "seg"),
    "umtl-ssl": ("cls", "weak", "strong", "seg"),
    "umtl-ssl-s": ("cls", "weak", "strong", "seg"),
    "multimix": ("cls", "weak", "strong", "seg", "useg"),
}


def test_streams_datasets_and_batch_keys_follow_the_flags():
    assert VARIANTS == tuple(EXPECTED) == V.VARIANTS
    for variant, streams in EXPECTED.items():
        assert V.streams_for(variant) == streams
        f = V.variant_flags(variant)
        assert ("cls" in streams) == f.has_cls and ("seg" in streams) == f.has_seg
    assert V.datasets_for("multimix") == ("unl_cls", "unl_seg")
    assert V.datasets_for("enc-ssl") == ("unl_cls",)
    assert V.datasets_for("umtl-s") == V.datasets_for("unet") == ()
    assert [V.batch_key(s) for s in V.STREAMS] == [
        "cls_img", "weak_img", "strong_img", "seg_img", "useg_img"]
    with pytest.raises(ValueError, match="unknown model variant 'nope'"):
        V.streams_for("nope")
    with pytest.raises(ValueError, match="unknown stream"):
        V.batch_key("unl")


def test_images_per_step_counts_only_the_variants_streams():
    d = DataConfig(cls_batch=3, unlabeled_batch=5, seg_batch=7, unlabeled_seg_batch=11)
    assert V.images_per_step("unet", d) == 7
    assert V.images_per_step("enc", d) == 3
    assert V.images_per_step("enc-ssl", d) == 3 + 2 * 5
    assert V.images_per_step("multimix", d) == 3 + 2 * 5 + 7 + 11


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_and_engine_read_the_same_table(variant):
    from multimix.engine import _needed_streams
    from multimix.model import MultiMixNet

    net = MultiMixNet(variant=variant, width=0.25)
    f = V.variant_flags(variant)
    assert net.flags is f
    assert (net.cls_head is not None) == f.has_cls and (net.decoder is not None) == f.has_seg
    assert _needed_streams(variant) == [V.batch_key(s) for s in EXPECTED[variant]]
