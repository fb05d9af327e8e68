"""Teacher-output cache: teacher outputs computed once per example, memory-mapped, joined on ``row_ids``.

See :mod:`appdistill.cache.store` for the layout and the safety rules (atomic builds, identity and
fingerprint checks, corrupt-shard detection and rebuild).
"""

from appdistill.cache.store import (
    CacheCorruptError,
    CacheError,
    CacheJoin,
    CacheManifest,
    CacheMismatchError,
    CacheMissingError,
    CacheRebuildWarning,
    ShardInfo,
    SplitShards,
    TeacherCache,
    build_caches,
    build_teacher_cache,
    get_or_build_cache,
    identity_key,
)

__all__ = [
    "CacheCorruptError", "CacheError", "CacheJoin", "CacheManifest", "CacheMismatchError", "CacheMissingError",
    "CacheRebuildWarning", "ShardInfo", "SplitShards", "TeacherCache", "build_caches", "build_teacher_cache",
    "get_or_build_cache", "identity_key",
]
