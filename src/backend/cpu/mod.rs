//! The CPU backend: a MIL interpreter. (being written)
