"""Input sources: list an input URL as shards, stream each shard's records.

Formats: webdataset (``.tar``, img2dataset layout), Parquet (Hugging Face ``Image`` column) and
image folders (class subfolders = labels), on any fsspec filesystem (local, ``s3://``, ...).
"""
from pipeline.sources.listing import list_source
from pipeline.sources.reading import iter_records
from pipeline.sources.storage import BadShard, SourceError

__all__ = ["BadShard", "SourceError", "iter_records", "list_source"]
