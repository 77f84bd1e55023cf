//! Tensor shapes in GGUF dimension order (innermost first).

/// A tensor shape with dimensions in GGUF order: `dims()[0]` is the contiguous dimension.
///
/// At most four dimensions are used by DeepSeek V4 files; the type does not limit the count,
/// the GGUF reader does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<u64>);

impl Shape {
    /// Builds a shape from GGUF-order dimensions (`ne[0]` first).
    pub fn from_gguf(dims: &[u64]) -> Shape {
        Shape(dims.to_vec())
    }

    /// Builds a shape from numpy-order dimensions (outermost first).
    pub fn from_numpy(dims: &[u64]) -> Shape {
        Shape(dims.iter().rev().copied().collect())
    }

    /// The dimensions in GGUF order (`ne[0]`, the contiguous one, first).
    pub fn dims(&self) -> &[u64] {
        &self.0
    }

    /// The dimensions in numpy order (outermost first): what shape comments show.
    pub fn numpy(&self) -> Vec<u64> {
        self.0.iter().rev().copied().collect()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// `ne[i]`, or 1 past the last dimension (as ggml pads shapes).
    pub fn ne(&self, i: usize) -> u64 {
        self.0.get(i).copied().unwrap_or(1)
    }

    /// Total element count, `None` on overflow.
    pub fn elem_count(&self) -> Option<u64> {
        self.0.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Number of rows: the product of every dimension but the first (`None` on overflow).
    pub fn n_rows(&self) -> Option<u64> {
        self.0
            .iter()
            .skip(1)
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_order_is_reversed() {
        let s = Shape::from_gguf(&[4096, 1024]);
        assert_eq!(s.numpy(), vec![1024, 4096]);
        assert_eq!(Shape::from_numpy(&[1024, 4096]), s);
        assert_eq!(s.n_rows(), Some(1024));
        assert_eq!(s.ne(3), 1);
        assert_eq!(Shape::from_gguf(&[u64::MAX, 2]).elem_count(), None);
    }
}
