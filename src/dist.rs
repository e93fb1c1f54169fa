//! Data-parallel training's collective communication: the [`Collective`]
//! seam the trainer talks to (its rank, the number of ranks, a sum over one
//! flat buffer, a sum in buckets overlapped with the work that makes them
//! ([`Overlapped`]), an all-gather of digests), with [`Single`], the
//! one-process run (every operation does nothing), and, with the `mpi` cargo
//! feature, `Mpi` over rsmpi's world communicator, for processes started by
//! `mpirun`.
//!
//! This module owns who talks to whom and [`agree`], the start-up check that
//! every rank has the same config, data and weights. It does not decide what
//! a rank computes: the trainer takes rank `r`'s contiguous share of each
//! global batch (`train`), and only rank 0 writes the run directory.
//! `docs/distributed.md` has how to run it and what it costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The processes of one data-parallel run and the collective operations over them.
/// Every rank calls the same operations in the same order.
pub trait Collective: Send + Sync {
    /// This process: 0..size.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// Each element becomes its sum over the ranks (f32; every rank receives
    /// the same values: MPI's reduction order is fixed for a given number of
    /// ranks and buffer length, whatever order messages arrive in).
    fn all_reduce_sum(&self, values: &mut [f32]);
    /// [`Collective::all_reduce_sum`] in f64 (losses, token counts, error flags).
    fn all_reduce_sum_f64(&self, values: &mut [f64]);
    /// Run `work` to its end and sum each of its buckets over the ranks
    /// (as [`Collective::all_reduce_sum`] would, element by element), a
    /// bucket as soon as the work has made it final, while the rest of the
    /// work runs. Every rank passes work of the same buckets; they are
    /// started in bucket order on every rank, whenever each rank finds them
    /// ready. This default runs the work, then sums the buckets one by one.
    fn all_reduce_overlapped(&self, work: &mut dyn Overlapped) -> CommTimes {
        while work.advance() {}
        let started = Instant::now();
        let mut buffer = Vec::new();
        let mut values = 0;
        for bucket in 0..work.buckets() {
            buffer.resize(work.bucket_len(bucket), 0.0);
            work.gather(bucket, &mut buffer);
            self.all_reduce_sum(&mut buffer);
            work.scatter(bucket, &buffer);
            values += buffer.len() as u64;
        }
        let spent = started.elapsed();
        CommTimes {
            exposed: spent,
            in_flight: spent,
            values,
            buckets: work.buckets(),
        }
    }
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Vec<u64>;
    /// End every rank of the run at once with `code` (MPI_Abort): for an
    /// error on one rank while the others wait in a collective.
    fn abort(&self, code: i32) -> !;
}

/// Work done in parts (a backward pass, layer by layer) whose results, a
/// flat buffer in buckets, become final one bucket after another, for
/// [`Collective::all_reduce_overlapped`]. Only the calling thread calls it.
pub trait Overlapped {
    /// Run the next part of the work: `false` when none was left. Once it
    /// returns `false` every bucket is ready (also after the work failed:
    /// it still takes part in the sums, so that no rank waits for it).
    fn advance(&mut self) -> bool;
    /// The number of buckets, the same on every rank.
    fn buckets(&self) -> usize;
    /// The values in `bucket`.
    fn bucket_len(&self, bucket: usize) -> usize;
    /// Whether no part of the work left changes `bucket` any more.
    fn ready(&self, bucket: usize) -> bool;
    /// Copy `bucket`'s values into `out` (`bucket_len` of them).
    fn gather(&self, bucket: usize, out: &mut [f32]);
    /// Write `bucket`'s values, summed over the ranks, back.
    fn scatter(&mut self, bucket: usize, sum: &[f32]);
}

/// What one [`Collective::all_reduce_overlapped`] cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommTimes {
    /// The time the calling thread spent on the sums instead of the work:
    /// copying buckets in and out, starting, polling and waiting for them
    /// (waiting includes waiting for a slower rank).
    pub exposed: Duration,
    /// From the first bucket's start to the last one's end as seen by the
    /// calling thread (at its polls: an upper bound); overlapped with the
    /// work except for `exposed`.
    pub in_flight: Duration,
    /// f32 values summed.
    pub values: u64,
    pub buckets: usize,
}

/// Whether `train` sums the gradients of two or more ranks overlapped with
/// the backward (the default) or in one all-reduce after it
/// (`ANEMONE_ALLREDUCE=flat`, to compare).
pub fn overlap_from_env() -> Result<bool> {
    match std::env::var("ANEMONE_ALLREDUCE").as_deref() {
        Err(_) | Ok("overlap") => Ok(true),
        Ok("flat") => Ok(false),
        Ok(other) => Err(Error::Invalid(format!(
            "ANEMONE_ALLREDUCE={other}: expected `overlap` (the default: the gradients are \
             summed layer by layer during the backward) or `flat` (one all-reduce after it)"
        ))),
    }
}

/// One process: rank 0 of 1; the operations leave their buffers as they are.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _values: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _values: &mut [f64]) {}
    fn all_reduce_overlapped(&self, work: &mut dyn Overlapped) -> CommTimes {
        while work.advance() {}
        CommTimes::default()
    }
    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        vec![value]
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The single process.
pub fn single() -> Arc<dyn Collective> {
    Arc::new(Single)
}

/// The number of ranks `mpirun` (Open MPI, or MPICH's Hydra) started this
/// process among, from its environment; `None` when no launcher started it.
pub fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse().ok())
}

/// The collective of this process: MPI's world when `mpirun` started it with
/// two or more ranks, [`Single`] otherwise (no MPI is touched: one process,
/// or `mpirun -np 1`, runs as today). An error when `mpirun` started several
/// ranks of a build without the `mpi` feature: each would train alone.
pub fn from_launcher() -> Result<Arc<dyn Collective>> {
    match launched_ranks() {
        Some(ranks) if ranks > 1 => open_mpi(ranks),
        _ => Ok(single()),
    }
}

#[cfg(feature = "mpi")]
fn open_mpi(_ranks: usize) -> Result<Arc<dyn Collective>> {
    Ok(Arc::new(mpi_world::Mpi::initialize()?))
}

#[cfg(not(feature = "mpi"))]
fn open_mpi(ranks: usize) -> Result<Arc<dyn Collective>> {
    Err(Error::Invalid(format!(
        "mpirun started this process as one of {ranks} ranks, but this anemone was built \
         without MPI, so each rank would train alone\nhint: build it with \
         `cargo build --release --features mpi` (docs/distributed.md)"
    )))
}

/// A 64-bit FNV-1a digest of `bytes`, for [`agree`].
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Check that every rank has the same `digest` of `what` (one all-gather):
/// an error on every rank, naming the first rank that differs from rank 0
/// and `hint`, when one does.
pub fn agree(dist: &dyn Collective, what: &str, digest: u64, hint: &str) -> Result<()> {
    let digests = dist.all_gather_u64(digest);
    match digests.iter().position(|d| *d != digests[0]) {
        None => Ok(()),
        Some(rank) => Err(Error::Invalid(format!(
            "rank {rank} of {} has another {what} than rank 0 (digest {:016x}, rank 0's \
             {:016x}); the ranks refuse to start\nhint: {hint}",
            digests.len(),
            digests[rank],
            digests[0]
        ))),
    }
}

/// The ranks whose flag in `flags` (one per rank, summed over the ranks) is
/// set, as "rank 1" or "ranks 1, 3".
pub fn failed_ranks(flags: &[f64]) -> Option<String> {
    let failed: Vec<String> = flags
        .iter()
        .enumerate()
        .filter(|(_, flag)| **flag != 0.0)
        .map(|(rank, _)| rank.to_string())
        .collect();
    match failed.len() {
        0 => None,
        1 => Some(format!("rank {}", failed[0])),
        _ => Some(format!("ranks {}", failed.join(", "))),
    }
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use std::sync::Mutex;
    use std::time::Instant;

    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    use mpi::topology::{Communicator, SimpleCommunicator};

    use super::{Collective, CommTimes, Overlapped};
    use crate::{Error, Result};

    /// Buckets an overlapped sum keeps in flight, at most (as many as fit
    /// in a pool of this many of its largest bucket): the pool's send and
    /// receive copies are the extra memory, a few layers' gradients, not a
    /// second copy of the whole gradient.
    const IN_FLIGHT: usize = 4;

    /// MPI's world communicator (rsmpi); MPI is finalized when it is dropped.
    pub struct Mpi {
        _universe: mpi::environment::Universe,
        rank: usize,
        size: usize,
        /// The send side of an all-reduce (rsmpi's reductions are not in place).
        send: Mutex<Vec<f32>>,
        /// The send and receive copies of the buckets of an overlapped sum.
        pool: Mutex<(Vec<f32>, Vec<f32>)>,
    }

    impl Mpi {
        /// Initialize MPI. Only the thread that calls this calls MPI later
        /// (the trainer's); rayon's workers never do.
        pub fn initialize() -> Result<Mpi> {
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or_else(|| Error::Invalid("MPI was initialized twice".into()))?;
            let world = universe.world();
            Ok(Mpi {
                rank: world.rank() as usize,
                size: world.size() as usize,
                _universe: universe,
                send: Mutex::new(Vec::new()),
                pool: Mutex::new((Vec::new(), Vec::new())),
            })
        }
    }

    /// Where an overlapped sum is: the next bucket to start, whether the
    /// work has parts left, and its clocks.
    struct Sums {
        next: usize,
        working: bool,
        times: CommTimes,
        first_start: Option<Instant>,
        last_end: Option<Instant>,
    }

    /// One request scope of an overlapped sum (rsmpi lends a buffer to a
    /// request until its scope ends, so the pool is reused scope by scope):
    /// start the ready buckets in order while they fit in the rest of the
    /// pool (`send`, `recv`), then alternate a part of the work with a poll
    /// (`MPI_Test`, which also moves the sums on) that scatters the sums
    /// that arrived. The scope ends, waiting for what is still in flight,
    /// when a ready bucket no longer fits, when nothing is in flight and
    /// part of the pool is used (so that it is free again), or when the
    /// work is done.
    fn window(state: &mut Sums, work: &mut dyn Overlapped, send: &mut [f32], recv: &mut [f32]) {
        let world = SimpleCommunicator::world();
        let capacity = send.len();
        let buckets = work.buckets();
        mpi::request::scope(|scope| {
            let (mut send, mut recv) = (send, recv);
            let mut in_flight = Vec::new();
            loop {
                let clock = Instant::now();
                let startable = |state: &Sums, work: &dyn Overlapped| -> bool {
                    state.next < buckets && (!state.working || work.ready(state.next))
                };
                while startable(state, work) && work.bucket_len(state.next) <= send.len() {
                    let len = work.bucket_len(state.next);
                    let (out, rest) = std::mem::take(&mut send).split_at_mut(len);
                    send = rest;
                    let (sum, rest) = std::mem::take(&mut recv).split_at_mut(len);
                    recv = rest;
                    work.gather(state.next, out);
                    let out: &[f32] = out;
                    let op = SystemOperation::sum();
                    let request = world.immediate_all_reduce_into(scope, out, sum, op);
                    in_flight.push((state.next, request));
                    state.first_start.get_or_insert(clock);
                    state.next += 1;
                }
                let mut pending = Vec::with_capacity(in_flight.len());
                for (bucket, request) in in_flight.drain(..) {
                    match request.test_with_data() {
                        Ok((_, sum)) => {
                            work.scatter(bucket, sum);
                            state.last_end = Some(Instant::now());
                        }
                        Err(request) => pending.push((bucket, request)),
                    }
                }
                in_flight = pending;
                state.times.exposed += clock.elapsed();
                let full = startable(state, work);
                let drained = in_flight.is_empty() && send.len() < capacity;
                if full || drained || !state.working {
                    break;
                }
                state.working = work.advance();
            }
            let clock = Instant::now();
            for (bucket, request) in in_flight {
                work.scatter(bucket, request.wait_for_data());
                state.last_end = Some(Instant::now());
            }
            state.times.exposed += clock.elapsed();
        });
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_reduce_sum(&self, values: &mut [f32]) {
            let mut send = self.send.lock().expect("all-reduce buffer");
            send.clear();
            send.extend_from_slice(values);
            SimpleCommunicator::world().all_reduce_into(&send[..], values, SystemOperation::sum());
        }
        fn all_reduce_sum_f64(&self, values: &mut [f64]) {
            let send = values.to_vec();
            SimpleCommunicator::world().all_reduce_into(&send[..], values, SystemOperation::sum());
        }
        /// Nonblocking all-reduces (`MPI_Iallreduce`), started and polled
        /// from this thread only, between the work's parts (see `window`):
        /// no communication thread, so nothing spins beside the work.
        fn all_reduce_overlapped(&self, work: &mut dyn Overlapped) -> CommTimes {
            let lens: Vec<usize> = (0..work.buckets()).map(|b| work.bucket_len(b)).collect();
            let total: usize = lens.iter().sum();
            let largest = lens.iter().copied().max().unwrap_or(0);
            let capacity = (IN_FLIGHT * largest).min(total).max(largest);
            let mut pool = self.pool.lock().expect("bucket pool");
            let (send, recv) = &mut *pool;
            if send.len() < capacity {
                send.resize(capacity, 0.0);
                recv.resize(capacity, 0.0);
            }
            let mut state = Sums {
                next: 0,
                working: true,
                times: CommTimes {
                    values: total as u64,
                    buckets: lens.len(),
                    ..CommTimes::default()
                },
                first_start: None,
                last_end: None,
            };
            while state.next < lens.len() || state.working {
                window(
                    &mut state,
                    work,
                    &mut send[..capacity],
                    &mut recv[..capacity],
                );
            }
            if let (Some(first), Some(last)) = (state.first_start, state.last_end) {
                state.times.in_flight = last.duration_since(first);
            }
            state.times
        }
        fn all_gather_u64(&self, value: u64) -> Vec<u64> {
            let mut all = vec![0u64; self.size];
            SimpleCommunicator::world().all_gather_into(&value, &mut all[..]);
            all
        }
        fn abort(&self, code: i32) -> ! {
            SimpleCommunicator::world().abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agree_names_the_first_rank_that_differs() {
        struct Four(Vec<u64>);
        impl Collective for Four {
            fn rank(&self) -> usize {
                0
            }
            fn size(&self) -> usize {
                4
            }
            fn all_reduce_sum(&self, _: &mut [f32]) {}
            fn all_reduce_sum_f64(&self, _: &mut [f64]) {}
            fn all_gather_u64(&self, _: u64) -> Vec<u64> {
                self.0.clone()
            }
            fn abort(&self, _: i32) -> ! {
                unreachable!()
            }
        }
        agree(&Four(vec![7, 7, 7, 7]), "config", 7, "h").unwrap();
        let error = agree(&Four(vec![7, 7, 9, 8]), "config", 7, "same flags")
            .unwrap_err()
            .to_string();
        assert!(error.contains("rank 2 of 4 has another config"), "{error}");
        assert!(error.contains("hint: same flags"), "{error}");
    }

    #[test]
    fn failed_ranks_lists_the_set_flags() {
        assert_eq!(failed_ranks(&[0.0, 0.0]), None);
        assert_eq!(failed_ranks(&[0.0, 1.0]).as_deref(), Some("rank 1"));
        assert_eq!(
            failed_ranks(&[1.0, 0.0, 1.0]).as_deref(),
            Some("ranks 0, 2")
        );
    }

    #[test]
    fn digest_is_fnv1a() {
        // FNV-1a 64 of "a" (the published test vector).
        assert_eq!(digest(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(digest(b""), 0xcbf2_9ce4_8422_2325);
    }
}
