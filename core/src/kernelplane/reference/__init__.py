"""Pure-PyTorch implementations of every capability: the fallback of last
resort and the oracle every other backend is tested against."""
