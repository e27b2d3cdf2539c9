"""N-gram (prompt lookup) speculative proposer for kernelplane."""
from .backoff import DraftBackoff
from .match_rule import scan_draft
from .ngram_index import NgramIndex
from .options import NgramOptions
from .proposer import NgramProposer, UnknownRequestError

__all__ = ["DraftBackoff", "NgramIndex", "NgramOptions", "NgramProposer", "UnknownRequestError", "scan_draft"]
