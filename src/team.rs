//! A team of threads kept for many short parallel loops (the decoder's
//! matrix-vector products, a few hundred per token): the calling thread and
//! `threads - 1` workers started once by [`scope`]. Each [`Team::run`] is a
//! loop over `0..count` split into one contiguous range per thread (as
//! OpenMP's static schedule: each thread streams its own stretch of the
//! weights); a thread takes its range in pieces of `grain` indices from the
//! front, and one that runs out takes half of what is left of another's from
//! the back (and that half can be taken from in turn). So a thread that
//! starts late, or that the OS stops, holds up the loop by at most the piece
//! it is on. Between loops a worker spins for [`SPIN`] before it yields and
//! parks: a loop that starts within that time costs a few atomic operations,
//! not a wake-up through the kernel (rayon's idle workers sleep within
//! microseconds, where OpenMP's spin). A thread whose spin was preempted or
//! ran out stops spinning for a while (`CROWDED`): on a machine with more
//! runnable threads than cores spinning costs more than it saves.
//!
//! The workers run one function given to [`scope`], which may borrow anything
//! that outlives the scope; the caller runs its own closure for the ranges it
//! takes, so it can write its results in place and copy in the workers'
//! afterwards. Safe code only: atomics, a mutex, `park`/`unpark` and scoped
//! threads.

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long a worker (or the caller waiting for one) spins before it parks:
/// far longer than the decoder's serial steps between loops (microseconds).
pub const SPIN: Duration = Duration::from_micros(100);

/// One loop: every thread's range left, `(front << 32) | back`. A new one per
/// loop, so a thread still holding the last loop's finds nothing left there.
struct Loop {
    ranges: Vec<Slot>,
    grain: usize,
    /// Indices done and reported (each thread reports once, when it finds
    /// nothing left).
    finished: AtomicUsize,
}

/// A range on a cache line of its own (128 bytes: the adjacent-line
/// prefetcher pairs lines): each thread takes pieces from its own without
/// taking the line from the others.
#[repr(align(128))]
struct Slot(AtomicU64);

fn pack(range: Range<usize>) -> u64 {
    (range.start as u64) << 32 | range.end as u64
}

fn unpack(v: u64) -> Range<usize> {
    (v >> 32) as usize..(v & u64::from(u32::MAX)) as usize
}

impl Loop {
    fn new(count: usize, grain: usize, threads: usize) -> Loop {
        let bound = |t: usize| count * t / threads;
        Loop {
            ranges: (0..threads)
                .map(|t| Slot(AtomicU64::new(pack(bound(t)..bound(t + 1)))))
                .collect(),
            grain: grain.max(1),
            finished: AtomicUsize::new(0),
        }
    }

    /// The next piece of thread `me`'s own range, if any is left.
    fn take(&self, me: usize) -> Option<Range<usize>> {
        let slot = &self.ranges[me].0;
        let mut now = slot.load(Acquire);
        loop {
            let left = unpack(now);
            if left.is_empty() {
                return None;
            }
            let end = (left.start + self.grain).min(left.end);
            match slot.compare_exchange_weak(now, pack(end..left.end), AcqRel, Acquire) {
                Ok(_) => return Some(left.start..end),
                Err(actual) => now = actual,
            }
        }
    }

    /// Move half of what is left of another thread's range (the back half)
    /// to `me`'s; false when nothing is left anywhere.
    fn steal(&self, me: usize) -> bool {
        let threads = self.ranges.len();
        for victim in (1..threads).map(|k| (me + k) % threads) {
            let slot = &self.ranges[victim].0;
            let mut now = slot.load(Acquire);
            loop {
                let left = unpack(now);
                if left.is_empty() {
                    break;
                }
                let cut = left.end - left.len().div_ceil(2);
                match slot.compare_exchange_weak(now, pack(left.start..cut), AcqRel, Acquire) {
                    Ok(_) => {
                        // Only its owner fills an empty range: no one else writes here now.
                        self.ranges[me].0.store(pack(cut..left.end), Release);
                        return true;
                    }
                    Err(actual) => now = actual,
                }
            }
        }
        false
    }

    /// Thread `me`'s pieces.
    fn pieces(&self, me: usize) -> Pieces<'_> {
        Pieces {
            this: self,
            me,
            done: 0,
        }
    }
}

/// A thread's pieces of one loop ([`Team::run`]): of its own range, then of
/// ranges it takes from others.
pub struct Pieces<'a> {
    this: &'a Loop,
    me: usize,
    /// Indices handed out.
    done: usize,
}

impl Iterator for Pieces<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        loop {
            if let Some(piece) = self.this.take(self.me) {
                self.done += piece.len();
                return Some(piece);
            }
            if !self.this.steal(self.me) {
                return None;
            }
        }
    }
}

/// What the caller and the workers share.
struct Shared {
    /// The current loop's number: a worker waits for it to change.
    number: AtomicU64,
    current: Mutex<Arc<Loop>>,
    /// Per worker: parked (or about to park) waiting for a loop.
    parked: Vec<AtomicBool>,
    /// The caller is parked (or about to) waiting for the workers.
    caller_parked: AtomicBool,
    caller: Thread,
    /// A worker's function panicked.
    panicked: AtomicBool,
    stop: AtomicBool,
}

/// A gap this long between two looks at the flag while spinning means the
/// OS ran something else on this CPU.
const PREEMPTED: Duration = Duration::from_micros(50);

/// How long a thread parks (after [`YIELDS`] yields) instead of spinning
/// after a spin that was preempted or ran out: most often the machine has
/// more runnable threads than cores (or the caller is busy elsewhere), and
/// then spinning only loses time: the scheduler's fair share spends the
/// spinner's time on nothing and then runs the other programs first, where a
/// thread that parks is run as soon as it is woken. Measured in
/// `docs/performance.md` (decoding, twelfth session).
const CROWDED: Duration = Duration::from_millis(10);

/// Yields before parking, when not spinning.
const YIELDS: usize = 32;

thread_local! {
    /// Until when this thread parks without spinning (see [`CROWDED`]).
    static NO_SPIN_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Spin on `ready` for up to [`SPIN`] (unless [`CROWDED`] says not to), then
/// park with `parked` set until it holds (whoever makes it hold clears
/// `parked` and unparks this thread).
fn wait(ready: impl Fn() -> bool, parked: &AtomicBool) {
    if ready() {
        return;
    }
    let started = Instant::now();
    let mut spin = NO_SPIN_UNTIL.get().is_none_or(|until| started >= until);
    let (mut last, mut spins, mut yields) = (started, 0u32, 0);
    while !ready() {
        spins = spins.wrapping_add(1);
        if spin && spins % 64 != 0 {
            std::hint::spin_loop();
            continue;
        }
        if spin {
            let now = Instant::now();
            if now - last < PREEMPTED && now - started < SPIN {
                last = now;
                continue;
            }
            NO_SPIN_UNTIL.set(Some(now + CROWDED));
            spin = false;
        }
        if yields < YIELDS {
            yields += 1;
            thread::yield_now();
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
}

impl Team<'_> {
    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Run every index of `0..count` (below 2^32) exactly once, in ranges of
    /// at most `grain` indices: the caller calls `own` for each range it takes;
    /// each worker calls the team's function once with its number (from 1) and
    /// its [`Pieces`], which the function must run all of. Returns when every
    /// range is done. Panics if a worker's function panicked (or left pieces).
    pub fn run(&self, count: usize, grain: usize, mut own: impl FnMut(Range<usize>)) {
        if self.workers.is_empty() || count <= grain.max(1) {
            if count > 0 {
                own(0..count);
            }
            return;
        }
        assert!(count < 1 << 32, "a team loop of {count} indices");
        let shared = self.shared;
        let this = Arc::new(Loop::new(count, grain, self.threads()));
        *shared.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&this);
        shared.number.fetch_add(1, SeqCst);
        for (parked, worker) in shared.parked.iter().zip(&self.workers) {
            wake(parked, worker);
        }
        let mut pieces = this.pieces(0);
        pieces.by_ref().for_each(&mut own);
        let mine = pieces.done;
        let done = || this.finished.load(SeqCst) == count - mine;
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

/// Start `threads - 1` workers (none for 0 or 1) that call `work(worker,
/// pieces)` in each [`Team::run`] (once per loop, so that a worker takes its
/// locks once, not once a piece), call `body` with the team, stop the workers
/// and return what `body` returned.
pub fn scope<R>(
    threads: usize,
    work: impl Fn(usize, &mut Pieces) + Sync,
    body: impl FnOnce(&Team) -> R,
) -> R {
    let workers = threads.max(1) - 1;
    let shared = Shared {
        number: AtomicU64::new(0),
        current: Mutex::new(Arc::new(Loop::new(0, 1, 1))),
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
                let handle = s.spawn(move || work_loop(shared, worker, work));
                handle.thread().clone()
            })
            .collect();
        let _stop = Stop(shared, &handles);
        let team = Team {
            shared,
            workers: handles.clone(),
        };
        body(&team)
    })
}

/// A worker: wait for each loop, do its part, until stopped.
fn work_loop(shared: &Shared, worker: usize, work: &(impl Fn(usize, &mut Pieces) + Sync)) {
    let mut seen = 0;
    loop {
        let fresh = || shared.number.load(SeqCst) != seen || shared.stop.load(SeqCst);
        wait(fresh, &shared.parked[worker - 1]);
        if shared.stop.load(SeqCst) {
            return;
        }
        seen = shared.number.load(SeqCst);
        let this = Arc::clone(&shared.current.lock().unwrap_or_else(|e| e.into_inner()));
        if this.ranges.len() <= worker {
            continue;
        }
        let mut pieces = this.pieces(worker);
        let run = std::panic::AssertUnwindSafe(|| work(worker, &mut pieces));
        let failed = std::panic::catch_unwind(run).is_err();
        // Pieces a panic left (or a function that stopped early): counted as
        // done so that the caller returns, and reported.
        if pieces.by_ref().count() > 0 || failed {
            shared.panicked.store(true, Release);
        }
        this.finished.fetch_add(pieces.done, SeqCst);
        wake(&shared.caller_parked, &shared.caller);
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
                |_, pieces| pieces.for_each(body),
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
                            let got = hits[i].load(Relaxed);
                            assert_eq!(got, want, "{threads} threads, index {i} of {count}");
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
        let add = |r: Range<usize>| {
            sum.fetch_add(r.sum::<usize>(), SeqCst);
        };
        scope(
            2,
            |_, pieces| pieces.for_each(add),
            |team| {
                for _ in 0..3 {
                    thread::sleep(SPIN * 5);
                    team.run(100, 1, add);
                }
            },
        );
        assert_eq!(sum.load(SeqCst), 3 * 4950);
    }

    #[test]
    fn a_stopped_thread_holds_up_a_loop_by_one_piece_only() {
        // The worker sleeps in its first piece; the caller takes the rest of its range.
        let by_caller = AtomicUsize::new(0);
        scope(
            2,
            |_, pieces| {
                pieces.next();
                thread::sleep(Duration::from_millis(50));
                pieces.for_each(drop);
            },
            |team| {
                team.run(1000, 10, |r| {
                    by_caller.fetch_add(r.len(), SeqCst);
                });
            },
        );
        assert!(by_caller.load(SeqCst) >= 990, "{}", by_caller.load(SeqCst));
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
