//! A team of threads kept for many short parallel loops (the decoder's
//! matrix-vector products, a few hundred per token): the calling thread and
//! `threads - 1` workers started once by [`scope`]. Each [`Team::run`] is a
//! loop over `0..count` whose ranges the caller and the workers claim from one
//! atomic counter, in pieces of half what remains per thread (at least
//! `grain`), so a thread that starts late or is stopped by the OS takes fewer
//! of them. Between loops a worker spins for [`SPIN`] before it parks, as
//! OpenMP's threads do: a loop that starts within that time costs a store and
//! a load, not a wake-up through the kernel (rayon's workers sleep within
//! microseconds, and each wake-up costs tens of them).
//!
//! The workers run one function given to [`scope`], which may borrow anything
//! that outlives the scope; the caller runs its own closure for the ranges it
//! claims, so it can write its results in place and copy in the workers'
//! afterwards. Safe code only: atomics, `park`/`unpark` and scoped threads.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long a worker (or the caller waiting for one) spins before it parks.
pub const SPIN: Duration = Duration::from_micros(200);

/// The low half of [`Shared::next`] and [`Shared::count`].
const LOW: u64 = u32::MAX as u64;

/// The counters the caller and the workers share.
struct Shared {
    /// `(loop number << 32) | first unclaimed index` of the current loop.
    next: AtomicU64,
    /// `(loop number << 32) | count` of the current loop: a worker still on
    /// an earlier loop must not take the new count for its own.
    count: AtomicU64,
    /// The current loop's least claim (a stale value only changes sizes).
    grain: AtomicUsize,
    /// Indices the workers have finished in the current loop.
    finished: AtomicUsize,
    /// Per worker: parked (or about to park) waiting for a loop.
    parked: Vec<AtomicBool>,
    /// The caller is parked (or about to) waiting for the workers.
    caller_parked: AtomicBool,
    caller: Thread,
    /// A worker's function panicked.
    panicked: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    /// The next range of loop `number` for one of `threads`, if any is left.
    fn claim(&self, number: u64, threads: usize) -> Option<Range<usize>> {
        let count = self.count.load(Acquire);
        if count >> 32 != number {
            return None;
        }
        let count = (count & LOW) as usize;
        let grain = self.grain.load(Acquire).max(1);
        let mut now = self.next.load(Acquire);
        loop {
            let start = (now & LOW) as usize;
            if now >> 32 != number || start >= count {
                return None;
            }
            let left = count - start;
            let size = (left / threads).max(grain).min(left);
            match self
                .next
                .compare_exchange_weak(now, now + size as u64, AcqRel, Acquire)
            {
                Ok(_) => return Some(start..start + size),
                Err(actual) => now = actual,
            }
        }
    }
}

/// Spin on `ready` for [`SPIN`], then park with `parked` set until it holds
/// (whoever makes it hold clears `parked` and unparks this thread).
fn wait(ready: impl Fn() -> bool, parked: &AtomicBool) {
    let started = Instant::now();
    let mut spins = 0u32;
    while !ready() {
        spins = spins.wrapping_add(1);
        if spins % 64 != 0 || started.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        parked.store(true, SeqCst);
        if !ready() {
            thread::park();
        }
        parked.store(false, SeqCst);
    }
}

/// Unpark the thread behind `parked` if it is parked or about to park.
fn wake(parked: &AtomicBool, thread: &Thread) {
    if parked.swap(false, SeqCst) {
        thread.unpark();
    }
}

/// The calling thread's handle on its team (see [`scope`]).
pub struct Team<'s> {
    shared: &'s Shared,
    workers: Vec<Thread>,
    /// The last loop's number.
    number: std::cell::Cell<u64>,
}

impl Team<'_> {
    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Run every index of `0..count` exactly once, in ranges of at least
    /// `grain` indices (but the last): the caller calls `own` for the ranges it
    /// claims, each worker calls the team's function with its number (from 1)
    /// and the range. Returns when every range is done. Panics if a worker's
    /// function panicked.
    pub fn run(&self, count: usize, grain: usize, mut own: impl FnMut(Range<usize>)) {
        if self.workers.is_empty() || count <= grain.max(1) {
            if count > 0 {
                own(0..count);
            }
            return;
        }
        assert!(count < 1 << 32, "a team loop of {count} indices");
        let shared = self.shared;
        let number = self.number.get() + 1;
        self.number.set(number);
        shared.count.store(number << 32 | count as u64, Release);
        shared.grain.store(grain, Release);
        shared.finished.store(0, Release);
        shared.next.store(number << 32, SeqCst);
        for (parked, worker) in shared.parked.iter().zip(&self.workers) {
            wake(parked, worker);
        }
        let mut mine = 0;
        while let Some(range) = shared.claim(number, self.threads()) {
            mine += range.len();
            own(range);
        }
        let done = || shared.finished.load(SeqCst) == count - mine;
        wait(done, &shared.caller_parked);
        if shared.panicked.load(Acquire) {
            panic!("a thread of the team panicked");
        }
    }
}

/// Stops the workers when the scope's body ends, even by a panic.
struct Stop<'a>(&'a Shared, &'a [Thread]);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, SeqCst);
        for (parked, worker) in self.0.parked.iter().zip(self.1) {
            wake(parked, worker);
        }
    }
}

/// Start `threads - 1` workers (none for 0 or 1) that run `work(worker,
/// range)` for the ranges they claim in each [`Team::run`], call `body` with
/// the team, stop the workers and return what `body` returned.
pub fn scope<R>(
    threads: usize,
    work: impl Fn(usize, Range<usize>) + Sync,
    body: impl FnOnce(&Team) -> R,
) -> R {
    let workers = threads.max(1) - 1;
    let shared = Shared {
        next: AtomicU64::new(0),
        count: AtomicU64::new(0),
        grain: AtomicUsize::new(1),
        finished: AtomicUsize::new(0),
        parked: (0..workers).map(|_| AtomicBool::new(false)).collect(),
        caller_parked: AtomicBool::new(false),
        caller: thread::current(),
        panicked: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    };
    let (shared, work) = (&shared, &work);
    thread::scope(|s| {
        let handles: Vec<Thread> = (1..=workers)
            .map(|worker| {
                let handle = s.spawn(move || work_loop(shared, worker, threads, work));
                handle.thread().clone()
            })
            .collect();
        let _stop = Stop(shared, &handles);
        let team = Team {
            shared,
            workers: handles.clone(),
            number: std::cell::Cell::new(0),
        };
        body(&team)
    })
}

/// A worker: wait for each loop, claim and run its ranges, until stopped.
fn work_loop(
    shared: &Shared,
    worker: usize,
    threads: usize,
    work: &(impl Fn(usize, Range<usize>) + Sync),
) {
    let mut seen = 0;
    loop {
        let fresh = || shared.next.load(SeqCst) >> 32 != seen || shared.stop.load(SeqCst);
        wait(fresh, &shared.parked[worker - 1]);
        if shared.stop.load(SeqCst) {
            return;
        }
        let number = shared.next.load(Acquire) >> 32;
        seen = number;
        while let Some(range) = shared.claim(number, threads) {
            let len = range.len();
            let run = std::panic::AssertUnwindSafe(|| work(worker, range));
            if std::panic::catch_unwind(run).is_err() {
                shared.panicked.store(true, Release);
            }
            shared.finished.fetch_add(len, SeqCst);
            wake(&shared.caller_parked, &shared.caller);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_index_runs_once_and_the_results_equal_the_serial_loop() {
        for threads in 1..=4 {
            let hits: Vec<AtomicU32> = (0..5000).map(|_| AtomicU32::new(0)).collect();
            let values: Vec<AtomicU64> = (0..5000).map(|_| AtomicU64::new(0)).collect();
            let f = |i: usize| (i as u64).wrapping_mul(2654435761) % 1000;
            let body = |range: Range<usize>| {
                for i in range {
                    hits[i].fetch_add(1, Relaxed);
                    values[i].store(f(i), Relaxed);
                }
            };
            scope(
                threads,
                |_, range| body(range),
                |team| {
                    assert_eq!(team.threads(), threads.max(1));
                    for (round, count) in [0, 1, 7, 64, 1000, 4999, 5000, 3, 2500]
                        .into_iter()
                        .enumerate()
                    {
                        hits.iter().for_each(|h| h.store(0, Relaxed));
                        let grain = round % 4 + 1;
                        team.run(count, grain, body);
                        for i in 0..5000 {
                            let want = u32::from(i < count);
                            assert_eq!(
                                hits[i].load(Relaxed),
                                want,
                                "{threads} threads, index {i} of {count}"
                            );
                            if i < count {
                                assert_eq!(values[i].load(Relaxed), f(i));
                            }
                        }
                    }
                },
            );
        }
    }

    #[test]
    fn a_slow_caller_lets_workers_park_and_wakes_them() {
        let sum = AtomicUsize::new(0);
        scope(
            2,
            |_, r: Range<usize>| {
                sum.fetch_add(r.sum::<usize>(), SeqCst);
            },
            |team| {
                for _ in 0..3 {
                    thread::sleep(SPIN * 5);
                    team.run(100, 1, |r| {
                        sum.fetch_add(r.sum::<usize>(), SeqCst);
                    });
                }
            },
        );
        assert_eq!(sum.load(SeqCst), 3 * 4950);
    }

    #[test]
    #[should_panic(expected = "panicked")]
    fn a_worker_panic_reaches_the_caller() {
        scope(
            2,
            |_, _| panic!("worker"),
            |team| {
                for _ in 0..100 {
                    team.run(1000, 1, |_| thread::sleep(Duration::from_micros(50)));
                }
            },
        );
    }
}
