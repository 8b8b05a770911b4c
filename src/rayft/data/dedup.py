"""Exact and near duplicates of parsed records, for `rayft data check` and `data.filter.dedup`.

A record is compared by what training reads of it: the stage's parsed item (its messages, tools,
answers; not the file's other fields such as ids), after its task prompt. Exact duplicates share
a hash of the item; near duplicates have a MinHash estimate of the Jaccard similarity of their
sets of word 3-grams (lower case, punctuation left out; each CJK character a word) at or above a
threshold, found with MinHash LSH (datasketch). Hashes and
signatures are computed where records are parsed (worker processes); the index that decides
"seen before" lives in one process, so the first occurrence is the one kept.

Memory: the exact index holds 8 bytes per distinct record, the near index a 512-byte signature
per record plus the LSH tables; both grow with the corpus (dedup is opt-in).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import zlib
from typing import Any, Optional

import numpy as np

NUM_PERM = 128
SHINGLE_WORDS = 3
# a word: a run of letters and digits, or one CJK character (those scripts put no spaces between words)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"  # kana, CJK ideographs, hangul
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
STRUCTURE_KEYS = ("role", "type")  # a message's role, a tool's type: form, not content
SCHEME = "affine32"  # datasketch's default since 2.0; signatures are rebuilt from their values with it
_permutations: dict = {}  # the MinHash permutations, built once per process


def _plain(item: Any) -> Any:
    """A parsed item as plain JSON values."""
    if dataclasses.is_dataclass(item):
        return _plain(dataclasses.asdict(item))
    if isinstance(item, dict):
        return {str(k): _plain(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [_plain(v) for v in item]
    return item


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key in sorted(value) if key not in STRUCTURE_KEYS for s in _strings(value[key])]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [] if value is None else [str(value)]


def record_identity(source: str, index: int) -> int:
    """Which record of which source (the same in every process): a record drawn again on purpose
    (a source's weight above 1, num_samples) is a repeat, not a duplicate."""
    return (zlib.crc32(source.encode()) << 40) + index


def same_source(identity: int, other: int) -> bool:
    """Whether two record identities are records of one source."""
    return identity >> 40 == other >> 40


def exact_key(item: Any) -> int:
    """A 64-bit hash of the item's content."""
    text = json.dumps(_plain(item), sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def signature(item: Any) -> np.ndarray:
    """The MinHash signature (NUM_PERM uint32 values) of the item's text as a set of word 3-grams."""
    from datasketch import MinHash

    words = _WORD.findall(" ".join(_strings(_plain(item))).lower())
    shingles = {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(max(1, len(words) - SHINGLE_WORDS + 1))}
    if "perm" not in _permutations:
        _permutations["perm"] = MinHash(num_perm=NUM_PERM, scheme=SCHEME).permutations
    minhash = MinHash(num_perm=NUM_PERM, permutations=_permutations["perm"], scheme=SCHEME)
    minhash.update_batch([s.encode() for s in shingles])
    return minhash.hashvalues.astype(np.uint32)


class Duplicates:
    """Which records repeat another, earlier record: `seen` answers for each record in order and
    remembers it when it is new. The same record met again (its identity) is not a duplicate."""

    def __init__(self, near_threshold: Optional[float] = None):
        self.exact: dict[int, int] = {}  # content hash -> identity of its first record
        self.repeated: Optional[int] = None  # after a duplicate: the identity of the record it repeats
        self.threshold = near_threshold
        self.signatures: list[np.ndarray] = []
        self.owners: list[int] = []  # identity of each signature's record
        self.lsh = None
        if near_threshold is not None:
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=near_threshold, num_perm=NUM_PERM)

    def seen(self, identity: int, key: int, values: Optional[np.ndarray] = None) -> Optional[str]:
        """'exact', 'near' (values: the record's signature) or None for a record kept."""
        if (first := self.exact.setdefault(key, identity)) != identity:
            self.repeated = first
            return "exact"
        if self.lsh is None or values is None:
            return None
        from datasketch import MinHash

        minhash = MinHash(hashvalues=values, scheme=SCHEME)
        # LSH gives candidates; the signatures' agreement (the Jaccard estimate) decides
        for candidate in self.lsh.query(minhash):
            if np.mean(self.signatures[candidate] == values) >= self.threshold:
                if self.owners[candidate] == identity:
                    return None
                self.repeated = self.owners[candidate]
                return "near"
        self.lsh.insert(len(self.signatures), minhash)
        self.signatures.append(values)
        self.owners.append(identity)
        return None
