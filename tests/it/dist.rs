//! Data-parallel training without MPI: two ranks as two threads of this
//! process, joined by an in-memory [`Collective`] that sums in rank order,
//! against one process with the whole batch (issue 24). The same checks
//! under `mpirun` are in `mpi.rs` (`--features mpi`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use anemone::backend::Precision;
use anemone::backend::cpu::CpuBackend;
use anemone::data::tokens::{Batcher, Order, TokenFile, TokenSpan, TokenWriter};
use anemone::dist::{Collective, CommTimes, Overlapped};
use anemone::model::kernels::KernelOptions;
use anemone::model::{ModelConfig, Weights, checkpoint};
use anemone::rng::Rng;
use anemone::train::engine::Engine;
use anemone::train::optim::{AdamW, Schedule};
use anemone::train::source::WindowSource;
use anemone::train::{Batches, Quiet, TrainConfig, Trainer};

use crate::common::{Tolerance, temp_dir};

/// What two ranks and one process may differ by: the gradients of a global
/// batch are summed in another order (each rank's sequences, then the
/// ranks), fp32 rounding of about 1e-7 of a sum, carried through 8 AdamW
/// updates; measured differences are below a tenth of these.
const LOSS: Tolerance = Tolerance {
    relative: 1e-5,
    absolute: 1e-6,
};
const WEIGHTS: Tolerance = Tolerance {
    relative: 1e-4,
    absolute: 1e-5,
};

/// Ranks as threads: each operation waits for every rank, then adds the
/// ranks' buffers in rank order.
struct Group {
    size: usize,
    barrier: Barrier,
    f32_sum: Mutex<Vec<f32>>,
    f64_sum: Mutex<Vec<f64>>,
    gathered: Mutex<Vec<u64>>,
    /// Buckets of overlapped sums summed before their work's end, by rank 0.
    summed_early: AtomicUsize,
}

struct ThreadRank {
    rank: usize,
    group: Arc<Group>,
}

impl ThreadRank {
    fn group(size: usize) -> Vec<Arc<dyn Collective>> {
        ThreadRank::group_counted(size).1
    }

    /// [`ThreadRank::group`], with the group (for its counts).
    fn group_counted(size: usize) -> (Arc<Group>, Vec<Arc<dyn Collective>>) {
        let group = Arc::new(Group {
            size,
            barrier: Barrier::new(size),
            f32_sum: Mutex::default(),
            f64_sum: Mutex::default(),
            gathered: Mutex::default(),
            summed_early: AtomicUsize::new(0),
        });
        let ranks = (0..size)
            .map(|rank| {
                let group = group.clone();
                Arc::new(ThreadRank { rank, group }) as Arc<dyn Collective>
            })
            .collect();
        (group, ranks)
    }

    /// Every rank adds `values` into `sum` in rank order, then reads it.
    fn reduce<T: Copy + Default + std::ops::Add<Output = T>>(
        &self,
        sum: &Mutex<Vec<T>>,
        values: &mut [T],
    ) {
        let group = &self.group;
        for turn in 0..group.size {
            if turn == self.rank {
                let mut sum = sum.lock().unwrap();
                if turn == 0 {
                    sum.clear();
                    sum.extend_from_slice(values);
                } else {
                    for (s, v) in sum.iter_mut().zip(values.iter()) {
                        *s = *s + *v;
                    }
                }
            }
            group.barrier.wait();
        }
        values.copy_from_slice(&sum.lock().unwrap());
        group.barrier.wait();
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.group.size
    }
    fn all_reduce_sum(&self, values: &mut [f32]) {
        self.reduce(&self.group.f32_sum, values);
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) {
        self.reduce(&self.group.f64_sum, values);
    }
    /// After each part of the work, every bucket it made ready, in order,
    /// summed as by `all_reduce_sum` (each rank waits for the others there,
    /// whenever it finds the bucket ready): a bucket sent before the work
    /// finished it would change the sums. Counts (rank 0) the buckets
    /// summed while the work still had a part to run.
    fn all_reduce_overlapped(&self, work: &mut dyn Overlapped) -> CommTimes {
        let mut next = 0;
        let mut buffer = Vec::new();
        let mut summed_last = 0;
        loop {
            let working = work.advance();
            if working && self.rank == 0 {
                let early = &self.group.summed_early;
                early.fetch_add(summed_last, Ordering::Relaxed);
            }
            summed_last = 0;
            while next < work.buckets() && work.ready(next) {
                buffer.resize(work.bucket_len(next), 0.0);
                work.gather(next, &mut buffer);
                self.all_reduce_sum(&mut buffer);
                work.scatter(next, &buffer);
                next += 1;
                summed_last += 1;
            }
            if !working {
                break;
            }
        }
        assert_eq!(
            next,
            work.buckets(),
            "the work ended with buckets not ready"
        );
        CommTimes {
            buckets: next,
            ..CommTimes::default()
        }
    }
    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        let group = &self.group;
        if self.rank == 0 {
            *group.gathered.lock().unwrap() = vec![0; group.size];
        }
        group.barrier.wait();
        group.gathered.lock().unwrap()[self.rank] = value;
        group.barrier.wait();
        let all = group.gathered.lock().unwrap().clone();
        group.barrier.wait();
        all
    }
    fn abort(&self, code: i32) -> ! {
        panic!("rank {} aborted with {code}", self.rank)
    }
}

/// 20,000 pseudo-random ids below 64 in `dir/tokens.bin`.
fn tokens(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.bin");
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..20_000).map(|_| rng.below(64) as u32).collect();
    let mut writer = TokenWriter::create(&path, 64).unwrap();
    writer.extend(&ids).unwrap();
    writer.finish().unwrap();
    path
}

fn config(batch: usize) -> TrainConfig {
    TrainConfig {
        model: ModelConfig::llama(32, 2, 4, 2, 64, 64, 16),
        preset: None,
        steps: 8,
        batch,
        seq: 16,
        accum: 2,
        lr: 3e-3,
        warmup: 2,
        schedule: Schedule::Cosine,
        optimizer: AdamW::default(),
        grad_clip: 1.0,
        seed: 4,
        eval_every: 4,
        eval_batches: 2,
        checkpoint_every: 0,
        fp16: false,
        lora: None,
    }
}

fn sources(tokens: &Path, c: &TrainConfig) -> (WindowSource, WindowSource) {
    let file = Arc::new(TokenFile::open(tokens).unwrap());
    let (train, val) = TokenSpan::split_tail(file, 0.1).unwrap();
    (
        WindowSource::new(Batcher::new(train, c.seq, Order::Random, c.seed).unwrap()),
        WindowSource::new(Batcher::new(val, c.seq, Order::Sequential, 0).unwrap()),
    )
}

fn engine(c: &TrainConfig) -> Engine {
    let backend = Box::new(CpuBackend::new(Precision::Fp32));
    Engine::new(backend, &c.model, c.seq, c.batch, KernelOptions::cpu()).unwrap()
}

/// `(train_loss, val_loss)` per step of a run's `metrics.jsonl`.
fn losses(run: &Path) -> (Vec<f32>, Vec<f32>) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let column = |name: &str| {
        rows.iter()
            .filter_map(|row| row[name].as_f64().map(|v| v as f32))
            .collect()
    };
    (column("train_loss"), column("val_loss"))
}

/// Two threads train `c` from `dir` as ranks 0 and 1 (`stop_after`
/// updates), or resume it when `resume`.
fn two_ranks(tokens: &Path, c: &TrainConfig, dir: &Path, resume: bool, stop_after: Option<u64>) {
    let ranks = ThreadRank::group(2);
    std::thread::scope(|scope| {
        for dist in ranks {
            scope.spawn(move || {
                let (mut data, mut val) = sources(tokens, c);
                let mut trainer = if resume {
                    Trainer::resume_on(dir, engine(c), &mut data, None, dist).unwrap()
                } else {
                    let weights = Weights::init(&c.model, 1);
                    Trainer::new_on(c.clone(), weights, engine(c), dir, dist).unwrap()
                };
                trainer
                    .train(&mut data, Some(&mut val), &mut Quiet, stop_after)
                    .unwrap();
            });
        }
    });
}

#[test]
fn two_ranks_of_batch_b_match_one_process_of_batch_2b_issue_24() {
    let dir = temp_dir("dist-two-ranks");
    let tokens = tokens(&dir);

    let one = dir.join("one");
    let c = config(4);
    let (mut data, mut val) = sources(&tokens, &c);
    let mut trainer =
        Trainer::new(c.clone(), Weights::init(&c.model, 1), engine(&c), &one).unwrap();
    trainer
        .train(&mut data, Some(&mut val), &mut Quiet, None)
        .unwrap();

    let two = dir.join("two");
    two_ranks(&tokens, &config(2), &two, false, None);

    let (train_one, val_one) = losses(&one);
    let (train_two, val_two) = losses(&two);
    assert_eq!(train_one.len(), 8);
    assert_eq!(val_one.len(), 2);
    LOSS.assert_close(&train_two, &train_one, "training losses");
    LOSS.assert_close(&val_two, &val_one, "held-out losses");
    // The comparison can fail: the losses move from step to step by far
    // more than the tolerance.
    let spread = train_one
        .iter()
        .fold(0.0f32, |m, l| m.max(l - train_one[0]).max(train_one[0] - l));
    assert!(spread > 1e-3, "{train_one:?}");
    let a = checkpoint::load(&one.join("checkpoint.bin")).unwrap();
    let b = checkpoint::load(&two.join("checkpoint.bin")).unwrap();
    WEIGHTS.assert_close(&b.weights.data, &a.weights.data, "final weights");
    let moved = a
        .weights
        .data
        .iter()
        .zip(&Weights::init(&c.model, 1).data)
        .filter(|(w, w0)| w != w0)
        .count();
    assert!(
        moved > a.weights.data.len() / 2,
        "only {moved} weights moved"
    );
}

#[test]
fn two_ranks_resume_exactly_and_refuse_another_rank_count_issue_24() {
    let dir = temp_dir("dist-resume");
    let tokens = tokens(&dir);
    let c = config(2);

    let straight = dir.join("straight");
    two_ranks(&tokens, &c, &straight, false, None);
    let split = dir.join("split");
    two_ranks(&tokens, &c, &split, false, Some(3));
    two_ranks(&tokens, &c, &split, true, None);

    assert_eq!(losses(&straight), losses(&split));
    let a = checkpoint::load(&straight.join("checkpoint.bin")).unwrap();
    let b = checkpoint::load(&split.join("checkpoint.bin")).unwrap();
    assert!(a.weights.data == b.weights.data, "resumed weights differ");

    // One process cannot continue what two ranks started: the global batch would change.
    let (mut data, _) = sources(&tokens, &c);
    let error = match Trainer::resume(&split, engine(&c), &mut data, Some(12)) {
        Ok(_) => panic!("one process resumed a two-rank run"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("trained by 2 rank(s) and is resumed by 1"),
        "{error}"
    );
    assert!(error.contains("mpirun -np 2"), "{error}");
}

/// Fine-tuning rows for the tiny qwen2 fixture's tokenizer: prompts and
/// completions of different lengths, so that the counted targets differ
/// between sequences and ranks (`data.jsonl` in `dir`).
fn lora_rows(dir: &Path) -> PathBuf {
    let path = dir.join("data.jsonl");
    let words = ["the", "king", "sea", "night", "a", "crown", "wind", "rose"];
    let mut rng = Rng::new(9);
    let mut text = |n: u64| -> String {
        let n = 1 + rng.below(n) as usize;
        (0..n)
            .map(|_| words[rng.below(8) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let rows: String = (0..60)
        .map(|_| {
            let row = serde_json::json!({"prompt": text(3), "completion": text(6)});
            format!("{row}\n")
        })
        .collect();
    std::fs::write(&path, rows).unwrap();
    path
}

/// Issue 24 for LoRA: two ranks of `--batch B` on fine-tuning examples
/// (prompts masked: the loss divides by the targets counted in the whole
/// global batch) give one process's `--batch 2B` losses and adapters; only
/// the adapters' gradients travel.
#[test]
fn two_lora_ranks_of_batch_b_match_one_process_of_batch_2b_issue_24() {
    two_lora_ranks_match_one_process(0.0);
}

/// The same with dropout on the adapters' input (the unmerged engine): a
/// mask belongs to a sequence's place in the global batch, so two ranks
/// draw the masks of one process of twice the batch.
#[test]
fn two_lora_ranks_with_dropout_match_one_process_issue_21_24() {
    two_lora_ranks_match_one_process(0.2);
}

fn two_lora_ranks_match_one_process(dropout: f32) {
    use anemone::model::hf::HfCheckpoint;
    use anemone::model::lora::{Adapters, LoraConfig, Target};
    use anemone::train::finetune::{self, SftRecord};
    use anemone::train::lora::load_checkpoint;
    let dir = temp_dir(&format!("dist-lora-{dropout}"));
    let data = lora_rows(&dir);
    let model_dir = crate::common::fixture("hf").join("qwen2");
    let base = Weights::from_hf(&HfCheckpoint::open(&model_dir).unwrap()).unwrap();
    let targets = [Target::Q, Target::V, Target::Down];
    let lora = LoraConfig::new(4, 8.0, dropout, &targets, None, 2).unwrap();
    let config = |batch: usize| TrainConfig {
        model: base.config().clone(),
        seq: 64,
        lr: 2e-2,
        lora: Some(lora.clone()),
        ..config(batch)
    };
    let adapters = Adapters::init(base.config(), &lora, &mut Rng::new(2)).unwrap();
    let record = SftRecord::of(&data, 0.2, true).unwrap();
    let run = |c: &TrainConfig, dir: &Path, dist: Arc<dyn Collective>| {
        let vocab = c.model.vocab_size;
        let mut sources =
            finetune::open(&record, &model_dir, c.seq, Order::Random, c.seed, vocab).unwrap();
        let (base, adapters) = (base.clone(), adapters.clone());
        let cpu = Box::new(CpuBackend::new(Precision::Fp32));
        let (seq, batch) = (c.seq, c.batch);
        let engine = Engine::for_lora(cpu, &base, &lora, seq, batch, KernelOptions::cpu()).unwrap();
        assert_eq!(engine.unmerged(), dropout > 0.0);
        let mut trainer =
            Trainer::new_lora_on(c.clone(), base, adapters, "qwen2", engine, dir, dist).unwrap();
        trainer
            .train(&mut sources.train, Some(&mut sources.val), &mut Quiet, None)
            .unwrap();
    };
    let one = dir.join("one");
    run(&config(4), &one, anemone::dist::single());
    let two = dir.join("two");
    std::thread::scope(|scope| {
        for dist in ThreadRank::group(2) {
            let (c, two, run) = (config(2), &two, &run);
            scope.spawn(move || run(&c, two, dist));
        }
    });
    let (train_one, val_one) = losses(&one);
    let (train_two, val_two) = losses(&two);
    assert_eq!((train_one.len(), val_one.len()), (8, 2));
    LOSS.assert_close(&train_two, &train_one, "LoRA training losses");
    LOSS.assert_close(&val_two, &val_one, "LoRA held-out losses");
    let spread = train_one
        .iter()
        .fold(0.0f32, |m, l| m.max(l - train_one[0]).max(train_one[0] - l));
    assert!(spread > 1e-3, "{train_one:?}");
    let a = load_checkpoint(&one.join("lora_checkpoint.bin")).unwrap();
    let b = load_checkpoint(&two.join("lora_checkpoint.bin")).unwrap();
    WEIGHTS.assert_close(&b.adapters.data, &a.adapters.data, "final adapters");
    assert!(
        a.adapters.data != adapters.data,
        "the adapters did not move"
    );
}

/// The columns of a run's `metrics.jsonl` that its gradients decide.
fn metrics(run: &Path) -> Vec<(f64, f64, Option<f64>)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let number = |name: &str| row[name].as_f64();
            (
                number("train_loss").unwrap(),
                number("grad_norm").unwrap(),
                number("val_loss"),
            )
        })
        .collect()
}

/// Two threads run `train` (one rank each, `Trainer::set_overlap(overlap)`
/// after `start` makes the trainer); returns the buckets rank 0 summed
/// before the end of a backward.
fn two_ranks_summing(
    overlap: bool,
    start: &(dyn Fn(Arc<dyn Collective>) -> (Trainer, WindowOrSft) + Sync),
) -> usize {
    let (group, ranks) = ThreadRank::group_counted(2);
    std::thread::scope(|scope| {
        for dist in ranks {
            scope.spawn(move || {
                let (mut trainer, mut data) = start(dist);
                trainer.set_overlap(overlap);
                let (train, val) = data.sources();
                trainer.train(train, Some(val), &mut Quiet, None).unwrap();
            });
        }
    });
    group.summed_early.load(Ordering::Relaxed)
}

/// A run's training and held-out sources: token windows or fine-tuning examples.
enum WindowOrSft {
    Windows(WindowSource, WindowSource),
    Sft(anemone::train::finetune::SftSources),
}

impl WindowOrSft {
    fn sources(&mut self) -> (&mut dyn Batches, &mut dyn Batches) {
        match self {
            WindowOrSft::Windows(train, val) => (train, val),
            WindowOrSft::Sft(sources) => (&mut sources.train, &mut sources.val),
        }
    }
}

/// Issue 24, item 2: the gradients summed bucket by bucket while the
/// backward runs (a layer's bucket sent once the scheduler has finished its
/// last weight gradient, often beside the layer below) are the flat
/// all-reduce's bit for bit: two ranks add each element once, in any
/// bucketing. The same losses, norms and final weights, for a model with
/// biases, QK-norm (whose `dWq`, `dWk` finish during the next layer) and an
/// untied classifier, with gradient accumulation.
#[test]
fn overlapped_bucket_sums_equal_one_flat_all_reduce_bit_for_bit_issue_24() {
    let dir = temp_dir("dist-overlap");
    let tokens = tokens(&dir);
    let c = TrainConfig {
        model: ModelConfig {
            qkv_bias: true,
            qk_norm: true,
            tied_embeddings: false,
            ..ModelConfig::llama(32, 3, 4, 2, 64, 64, 16)
        },
        ..config(2)
    };
    let runs: Vec<(PathBuf, usize)> = [true, false]
        .into_iter()
        .map(|overlap| {
            let run = dir.join(if overlap { "overlapped" } else { "flat" });
            let start = |dist: Arc<dyn Collective>| {
                let (train, val) = sources(&tokens, &c);
                let weights = Weights::init(&c.model, 1);
                let trainer = Trainer::new_on(c.clone(), weights, engine(&c), &run, dist).unwrap();
                (trainer, WindowOrSft::Windows(train, val))
            };
            let early = two_ranks_summing(overlap, &start);
            (run, early)
        })
        .collect();
    let (overlapped, flat) = (&runs[0].0, &runs[1].0);
    // 3 layers' buckets and the rest's, 8 updates: the layers' buckets went
    // before the backward's end; none without overlap.
    assert!(runs[0].1 >= 8 * 2, "{} buckets summed early", runs[0].1);
    assert_eq!(runs[1].1, 0);
    let (a, b) = (metrics(overlapped), metrics(flat));
    assert_eq!(a.len(), 8);
    assert_eq!(a, b, "losses and norms, overlapped against flat");
    let a = checkpoint::load(&overlapped.join("checkpoint.bin")).unwrap();
    let b = checkpoint::load(&flat.join("checkpoint.bin")).unwrap();
    assert!(a.weights.data == b.weights.data, "final weights differ");
    assert!(a.weights.data != Weights::init(&c.model, 1).data);
}

/// [`overlapped_bucket_sums_equal_one_flat_all_reduce_bit_for_bit_issue_24`]
/// for LoRA: only the adapters' gradients travel, a layer's adapters a bucket.
#[test]
fn overlapped_lora_sums_equal_one_flat_all_reduce_bit_for_bit_issue_24() {
    use anemone::model::hf::HfCheckpoint;
    use anemone::model::lora::{Adapters, LoraConfig, Target};
    use anemone::train::finetune::{self, SftRecord};
    use anemone::train::lora::load_checkpoint;
    let dir = temp_dir("dist-overlap-lora");
    let data = lora_rows(&dir);
    let model_dir = crate::common::fixture("hf").join("qwen2");
    let base = Weights::from_hf(&HfCheckpoint::open(&model_dir).unwrap()).unwrap();
    let lora = LoraConfig::new(4, 8.0, 0.0, &[Target::K, Target::O, Target::Up], None, 2).unwrap();
    let c = TrainConfig {
        model: base.config().clone(),
        seq: 64,
        lr: 2e-2,
        lora: Some(lora.clone()),
        ..config(2)
    };
    let adapters = Adapters::init(base.config(), &lora, &mut Rng::new(2)).unwrap();
    let record = SftRecord::of(&data, 0.2, true).unwrap();
    let runs: Vec<(PathBuf, usize)> = [true, false]
        .into_iter()
        .map(|overlap| {
            let run = dir.join(if overlap { "overlapped" } else { "flat" });
            let start = |dist: Arc<dyn Collective>| {
                let vocab = c.model.vocab_size;
                let sources =
                    finetune::open(&record, &model_dir, c.seq, Order::Random, c.seed, vocab)
                        .unwrap();
                let (base, adapters) = (base.clone(), adapters.clone());
                let trainer = Trainer::new_lora_on(
                    c.clone(),
                    base,
                    adapters,
                    "qwen2",
                    engine(&c),
                    &run,
                    dist,
                )
                .unwrap();
                (trainer, WindowOrSft::Sft(sources))
            };
            let early = two_ranks_summing(overlap, &start);
            (run, early)
        })
        .collect();
    let (overlapped, flat) = (&runs[0].0, &runs[1].0);
    assert!(runs[0].1 >= 8, "{} buckets summed early", runs[0].1);
    assert_eq!(runs[1].1, 0);
    let (a, b) = (metrics(overlapped), metrics(flat));
    assert_eq!(a.len(), 8);
    assert_eq!(a, b, "LoRA losses and norms, overlapped against flat");
    let a = load_checkpoint(&overlapped.join("lora_checkpoint.bin")).unwrap();
    let b = load_checkpoint(&flat.join("lora_checkpoint.bin")).unwrap();
    assert!(a.adapters.data == b.adapters.data, "final adapters differ");
    assert!(
        a.adapters.data != adapters.data,
        "the adapters did not move"
    );
}

/// A training source whose `fail_at`-th batch (from 1) is an error.
struct FailingAt {
    inner: WindowSource,
    calls: usize,
    fail_at: usize,
}

impl Batches for FailingAt {
    fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) -> anemone::Result<()> {
        self.calls += 1;
        if self.calls == self.fail_at {
            return Err(anemone::Error::Invalid("the token file went away".into()));
        }
        self.inner.next_batch(inputs, targets)
    }
    fn state(&self) -> serde_json::Value {
        self.inner.state()
    }
    fn restore(&mut self, state: &serde_json::Value) -> anemone::Result<()> {
        self.inner.restore(state)
    }
    fn rewind(&mut self) {
        self.inner.rewind()
    }
}

/// The failure protocol with overlapped sums: rank 1's data fails in
/// update 2 before its last backward, while rank 0 runs its backward and
/// starts the buckets' sums; rank 1 still takes part in them (its buffer as
/// it is), then raises its flag, so neither rank waits forever and rank 0
/// stops naming rank 1.
#[test]
fn a_rank_that_fails_before_its_backward_still_completes_the_overlapped_sums_issue_24() {
    let dir = temp_dir("dist-overlap-fail");
    let tokens = tokens(&dir);
    let c = config(2);
    let run = dir.join("run");
    let (group, ranks) = ThreadRank::group_counted(2);
    // Threads of their own, so that a rank left waiting in a sum fails the
    // test after a while instead of hanging it.
    let (sender, receiver) = std::sync::mpsc::channel();
    for dist in ranks {
        let (c, tokens, run, sender) = (c.clone(), tokens.clone(), run.clone(), sender.clone());
        std::thread::spawn(move || {
            let rank = dist.rank();
            let (data, mut val) = sources(&tokens, &c);
            let fail_at = if rank == 1 { 3 } else { usize::MAX };
            let mut data = FailingAt {
                inner: data,
                calls: 0,
                fail_at,
            };
            let weights = Weights::init(&c.model, 1);
            let mut trainer = Trainer::new_on(c.clone(), weights, engine(&c), &run, dist).unwrap();
            let result = trainer.train(&mut data, Some(&mut val), &mut Quiet, None);
            sender
                .send((rank, result.map_err(|e| e.to_string())))
                .unwrap();
        });
    }
    let mut errors = vec![String::new(); 2];
    for _ in 0..2 {
        let (rank, result) = receiver
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("a rank still waits 120 s after rank 1 failed");
        errors[rank] = result.expect_err("a rank finished the run");
    }
    assert!(
        errors[0].contains("rank 1 of 2 failed in update 2"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("the token file went away"),
        "{}",
        errors[1]
    );
    // Update 1 and rank 0's update 2 summed buckets during the backward.
    assert!(group.summed_early.load(Ordering::Relaxed) >= 2);
}
