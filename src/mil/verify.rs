//! Verifier: structural checks plus the catalogue of ANE rules. (being written)
