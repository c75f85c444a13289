"""Model variants and the input streams each consumes: the one table (no torch, no Ray).

One row per model of the paper's table (:data:`VARIANT_FLAGS`); the streams a variant consumes
are derived from its flags (:func:`streams_for`), never listed again elsewhere. The config
(``model.variant``), the model (which modules exist), the objective (which terms), the engine
(which batch keys) and the data layer (which pools and Ray Datasets) all read this module.

The five input streams have one name each, used everywhere:

============  ==================  =================================  ======================
stream        batch key           source                             model keyword / output
============  ==================  =================================  ======================
``cls``       ``cls_img``         labeled classification pool        ``cls`` / ``cls_logits``
                                  (weak view; ``cls_label`` beside)
``weak``      ``weak_img``        unlabeled classification images,   ``weak`` /
                                  weak view (dataset ``unl_cls``)    ``weak_logits``
``strong``    ``strong_img``      the *same* images, strong view     ``strong`` /
                                  (dataset ``unl_cls``)              ``strong_logits``
``seg``       ``seg_img``         labeled segmentation pool          ``seg`` / ``seg_logits``
                                  (``seg_mask``, ``seg_ignore``)
``useg``      ``useg_img``        unlabeled segmentation stream      ``useg`` /
                                  (dataset ``unl_seg``)              ``useg_logits``
============  ==================  =================================  ======================

The unlabeled streams come from two Ray Datasets (:data:`DATASETS`): ``unl_cls`` carries the
weak and the strong view of each image (one row, two columns), ``unl_seg`` the unlabeled
segmentation stream. Their names also seed the augmentation (``row_keys(..., stream)``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DATASETS",
    "LABELED",
    "STREAMS",
    "VARIANTS",
    "VARIANT_FLAGS",
    "VariantFlags",
    "batch_key",
    "batch_sizes",
    "datasets_for",
    "images_per_step",
    "streams_for",
    "variant_flags",
]

#: the five input streams, in the order the model concatenates them
STREAMS = ("cls", "weak", "strong", "seg", "useg")

#: Ray Dataset name → the streams its rows carry (one column ``<stream>_img`` each)
DATASETS = {"unl_cls": ("weak", "strong"), "unl_seg": ("useg",)}

#: the streams drawn from the small in-memory labeled pools (task → stream)
LABELED = {"cls": "cls", "seg": "seg"}


@dataclass(frozen=True)
class VariantFlags:
    has_cls: bool  # classification head + supervised CE
    has_seg: bool  # decoder + supervised Dice
    ssl: bool  # pseudo-labels on unlabeled cls images (weak → strong)
    bridge: bool  # saliency bridge into the decoder
    seg_kl: bool  # KL consistency between labeled and unlabeled seg predictions

    @property
    def streams(self) -> tuple[str, ...]:
        """The input streams this variant consumes, in :data:`STREAMS` order."""
        use = {"cls": self.has_cls, "weak": self.ssl, "strong": self.ssl,
               "seg": self.has_seg, "useg": self.seg_kl}
        return tuple(s for s in STREAMS if use[s])


#: One row per model in the paper's table.
VARIANT_FLAGS: dict[str, VariantFlags] = {
    "unet": VariantFlags(has_cls=False, has_seg=True, ssl=False, bridge=False, seg_kl=False),
    "enc": VariantFlags(has_cls=True, has_seg=False, ssl=False, bridge=False, seg_kl=False),
    "enc-ssl": VariantFlags(has_cls=True, has_seg=False, ssl=True, bridge=False, seg_kl=False),
    "umtl": VariantFlags(has_cls=True, has_seg=True, ssl=False, bridge=False, seg_kl=False),
    "umtl-s": VariantFlags(has_cls=True, has_seg=True, ssl=False, bridge=True, seg_kl=False),
    "umtl-ssl": VariantFlags(has_cls=True, has_seg=True, ssl=True, bridge=False, seg_kl=False),
    "umtl-ssl-s": VariantFlags(has_cls=True, has_seg=True, ssl=True, bridge=True, seg_kl=False),
    "multimix": VariantFlags(has_cls=True, has_seg=True, ssl=True, bridge=True, seg_kl=True),
}

#: the variant names (``model.variant``), in the paper's table order
VARIANTS = tuple(VARIANT_FLAGS)


def variant_flags(variant: str) -> VariantFlags:
    """The flags of ``variant``. Raises ValueError naming the known variants."""
    try:
        return VARIANT_FLAGS[variant]
    except KeyError:
        raise ValueError(
            f"unknown model variant {variant!r} (one of {', '.join(VARIANT_FLAGS)})"
        ) from None


def streams_for(variant: str) -> tuple[str, ...]:
    """The input streams ``variant`` consumes, e.g. ``("cls", "weak", "strong")`` for
    ``enc-ssl``."""
    return variant_flags(variant).streams


def batch_key(stream: str) -> str:
    """The batch key of a stream's images: ``<stream>_img`` (uint8 ``(B, 1, H, W)``)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r} (one of {', '.join(STREAMS)})")
    return f"{stream}_img"


def datasets_for(variant: str) -> tuple[str, ...]:
    """The Ray Datasets (:data:`DATASETS`) ``variant`` reads: those carrying a stream it uses."""
    need = set(streams_for(variant))
    return tuple(name for name, carried in DATASETS.items() if need & set(carried))


def batch_sizes(data_cfg) -> dict[str, int]:
    """Per-worker batch size of each stream, from a ``DataConfig`` (``cls_batch``,
    ``unlabeled_batch`` for both views, ``seg_batch``, ``unlabeled_seg_batch``)."""
    return {"cls": data_cfg.cls_batch, "weak": data_cfg.unlabeled_batch,
            "strong": data_cfg.unlabeled_batch, "seg": data_cfg.seg_batch,
            "useg": data_cfg.unlabeled_seg_batch}


def images_per_step(variant: str, data_cfg) -> int:
    """Images one worker feeds the model per training step: the batch sizes of the streams
    ``variant`` consumes (the weak and strong views count as two images each)."""
    sizes = batch_sizes(data_cfg)
    return sum(sizes[s] for s in streams_for(variant))
