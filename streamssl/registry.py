"""The names a config may choose for ``ssl.method``, ``strategy`` and ``data.source``, and where
each one lives.

One list per kind, read by both sides: ``config.py`` takes its allowed values from the keys
(so a bad name fails validation naming the field and these values), and ``ssl.build_method`` /
``continual.build_strategy`` import the class a name points to. Entries are ``"module:Class"``
strings rather than classes because the config sits below the packages that define them (they
import the config); nothing here imports them. Adding a method or a strategy is its module plus
one line below (docs/extending.md).
"""

from __future__ import annotations

import importlib
from typing import Any

#: ``ssl.method`` -> the :class:`~streamssl.ssl.base.SSLMethod` subclass.
SSL_METHODS: dict[str, str] = {
    "mocov2": "streamssl.ssl.mocov2:MoCoV2",
    "simclr": "streamssl.ssl.simclr:SimCLR",
    "byol": "streamssl.ssl.byol:BYOL",
    "simsiam": "streamssl.ssl.simsiam:SimSiam",
    "barlow_twins": "streamssl.ssl.barlow_twins:BarlowTwins",
    "vicreg": "streamssl.ssl.vicreg:VICReg",
    "dino": "streamssl.ssl.dino:DINO",
    "supervised": "streamssl.ssl.supervised:Supervised",
}

#: The ``ssl.method`` names that train on the rows' labels (cross-entropy baselines, not SSL): the
#: training loop hands the batch's labels to these alone, and the stream driver refuses to run
#: them on a dataset whose streamed split is not fully labelled.
LABELLED_METHODS: frozenset[str] = frozenset({"supervised"})

#: ``strategy`` -> the :class:`~streamssl.continual.base.StrategyPlugin` it adds to the training
#: loop (None: naive sequential training, nothing added). Replay and the weight regularizers are
#: chosen by their own sections (``replay``, ``regularization``) and compose with these.
STRATEGIES: dict[str, str | None] = {
    "naive": None,
    "joint": "streamssl.continual.joint:Joint",
    "cumulative": "streamssl.continual.joint:Cumulative",
    "cassle": "streamssl.continual.cassle:CaSSLe",
    "lump": "streamssl.continual.lump:LUMP",
}


#: ``data.source`` (``streamssl ingest --source``) -> the
#: :class:`~streamssl.data.sources.base.Source` subclass; its ``from_src(src)`` builds it from
#: ``data.src`` / ``--src`` (None: the source's default location).
DATA_SOURCES: dict[str, str] = {
    "fashion-mnist": "streamssl.data.sources.fashion_mnist:FashionMNISTSource",
    "idx": "streamssl.data.sources.idx:IdxSource",
    "folder": "streamssl.data.sources.folder:FolderSource",
    "manifest": "streamssl.data.sources.manifest:ManifestSource",
}


def resolve(entry: str) -> Any:
    """The object a ``"module:Class"`` entry names."""
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr)
