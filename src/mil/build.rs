//! Builder API for writing kernels. (being written)

/// Builds a [`super::Program`] statement by statement.
pub struct Builder;
