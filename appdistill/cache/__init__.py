"""Teacher-output cache: teacher outputs computed once per example, memory-mapped, joined on ``row_ids``.

See :mod:`appdistill.cache.format` for the layout and the safety rules (atomic builds, identity and
fingerprint checks, corrupt-shard detection and rebuild).
"""

from appdistill.cache.builder import build_teacher_cache, get_or_build_cache
from appdistill.cache.format import (CacheCorruptError, CacheError, CacheManifest, CacheMismatchError,
                                     CacheMissingError, CacheRebuildWarning, ShardInfo, SplitShards, identity_key)
from appdistill.cache.reader import CacheJoin, TeacherCache

__all__ = [
    "CacheCorruptError", "CacheError", "CacheJoin", "CacheManifest", "CacheMismatchError", "CacheMissingError",
    "CacheRebuildWarning", "ShardInfo", "SplitShards", "TeacherCache", "build_teacher_cache",
    "get_or_build_cache", "identity_key",
]
