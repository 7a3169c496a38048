"""Moved: the shard format (manifest included) lives in `pipeline.shard_format`."""
from pipeline.shard_format import (FORMAT, MANIFEST_NAME, VERSION, ManifestError, load_manifest,  # noqa: F401
                                   parse_manifest, write_manifest)
