"""Images in, ordered segments out: ingest to Parquet shards, stream plans, segment reading on Ray Data.

Layering (each module imports only modules to its left; none imports ``streamssl.data.streams``):
layout, images -> sources/ (base -> idx -> fashion_mnist; folder; manifest) -> derived_domains -> ingest;
layout -> plan (stream files) -> segments (ordered reading) -> class_grouping -> protocols (make_plan).
Outside this package only ``streamssl.config`` may be imported, plus ``streamssl.ssl.backbones`` for
class_grouping's default reference encoder (lazily); ``streams`` only re-exports for old callers.
"""
