//! The GGUF v3 container: a strict reader over a memory map and a writer.
//!
//! (Being written: see the foundation issue.)
