//! Shared set-up for the criterion benchmarks (random weights at the real expert shapes).

#![warn(missing_docs)]
