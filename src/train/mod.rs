//! Training: step orchestration over the backend trait, the optimizer and
//! schedules, loss scaling and gradient accumulation.

pub mod engine;
pub mod optim;
