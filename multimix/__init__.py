"""MultiMix on Ray: semi-supervised multi-task chest X-ray classification + lung segmentation.

The package is cut into layers (docs/DESIGN.md, "Layers"; checked by tests/test_layers.py):
foundation (``errors``, ``variants``, ``config``) → storage, the dataset format and the cluster
(``data.storage``, ``data.dataset``, ``resources``, …) → compute without Ray (``model``,
``objective``, ``engine``, ``metrics``, ``data.augment``, …) → offline data tools
(``data.prepare``, ``data.verify``, ``data.splits``, ``data.overlap``) → run-time data on Ray
Data (``data.pipeline`` and its readers) → run services (``preflight``, ``checkpoint``,
``validate``, ``plots``) → commands (``train``, ``evaluate``, ``predict``, ``tune``,
``experiment``, ``demo``) → entry points (``cli``, ``bench``). A module imports only from its
own layer or lower ones; layers 0–2 run without Ray.
"""

__version__ = "0.1.0"
