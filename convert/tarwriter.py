"""Moved: shard writing and the DALI index live in `pipeline.shard_format`."""
from pipeline.shard_format import ShardWriter, atomic_write_bytes, sha256_file  # noqa: F401
from pipeline.shard_format import parse_index as parse_dali_index  # noqa: F401


def read_dali_index(path):
    from pipeline.shard_format import read_index

    return [members for _, members in read_index(path)]
