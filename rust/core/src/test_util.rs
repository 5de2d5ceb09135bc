//! Helpers shared by the unit tests of several modules.

/// Xorshift64: the test data's random numbers (`x` must not be 0). Advances `x` and
/// returns its new value.
pub(crate) fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}
