//! Text generation on the CPU: a plain-Rust Llama decoder over [`Weights`]
//! with a per-layer KV cache, and temperature / top-p sampling.
//!
//! This is the reference decoder: one token at a time, f32, llama2.c math
//! (RMSNorm, interleaved-pair RoPE, GQA attention, SwiGLU, residuals with no
//! scaling) and the features a config adds (q/k/v biases, QK-norm, scaled
//! RoPE frequencies). It does not use MIL or any backend. The KV cache grows
//! with the context, so a model with a long `seq_len` costs only what it uses. The [`Generator`] takes and
//! gives token ids; on top of it, [`stream`] takes a text prompt and writes
//! text through a [`Tokenizer`] (the `generate` command), and [`samples`]
//! writes the main job's closing samples. For a Hugging Face model (or a run
//! made from one), [`HfText`] gathers its tokenizer, chat template and stop
//! ids, and [`stream_hf`] writes what it generates.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use crate::data::hf::{ChatMessage, ChatTemplate, HfTokenizer};
use crate::data::tokenizer::Tokenizer;
use crate::model::hf::files::base_config;
use crate::model::{ModelConfig, Param, Weights, WeightsView};
use crate::rng::Rng;
use crate::team::{self, Team};
use crate::{Error, Result};

/// Beginning-of-sequence token id (llama2.c convention). `anemone tokenize`
/// starts every document with it, so a model sampling it has ended its
/// document: generation stops there, as llama2.c's `run.c` does.
pub const BOS: u32 = 1;
/// End-of-sequence token id: generation stops when it is sampled.
pub const EOS: u32 = 2;
/// The tokens that end generation by default ([`Generator::set_stop_tokens`]
/// adds a model's own, such as a Hugging Face config's `eos_token_id`s).
pub const STOP_TOKENS: [u32; 2] = [BOS, EOS];
/// The largest sampling temperature accepted.
pub const MAX_TEMPERATURE: f32 = 100.0;

/// Picks the next token from a row of logits.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// 0 = greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Nucleus mass in (0, 1); values outside it sample from the full distribution.
    pub top_p: f32,
    pub rng: Rng,
}

impl Sampler {
    /// Argmax decoding.
    pub fn greedy() -> Sampler {
        Sampler::new(0.0, 1.0, 0)
    }

    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Sampler {
        Sampler {
            temperature,
            top_p,
            rng: Rng::new(seed),
        }
    }

    /// [`Sampler::new`] for user-given settings: temperature in
    /// `[0, MAX_TEMPERATURE]` (0 is greedy), `top_p` in `(0, 1]` (1 keeps every
    /// token); anything else (NaN, negative, 2) is an error naming the flag.
    pub fn checked(temperature: f32, top_p: f32, seed: u64) -> Result<Sampler> {
        if !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
            return Err(Error::out_of_range(
                "--temperature",
                temperature,
                &format!("a number in [0, {MAX_TEMPERATURE}] (0 is greedy)"),
            ));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::out_of_range(
                "--top-p",
                top_p,
                "a number in (0, 1] (1 samples from every token)",
            ));
        }
        Ok(Sampler::new(temperature, top_p, seed))
    }

    /// The next token id. Temperature 0 is argmax; otherwise softmax of
    /// `logits / temperature`, restricted to the smallest set of most likely
    /// tokens whose mass exceeds `top_p` (as llama2.c's `sample_topp`), and
    /// one draw from the seeded RNG.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut probs: Vec<f32> = logits.iter().map(|x| x / self.temperature).collect();
        softmax(&mut probs);
        let coin = self.rng.next_f32();
        if !(self.top_p > 0.0 && self.top_p < 1.0) {
            return sample_cdf(probs.iter().copied().enumerate(), coin, 1.0);
        }
        // Tokens below (1 - p) / (n - 1) cannot be in the nucleus: drop them before sorting.
        // The most likely token always stays (the cutoff can exceed it when top_p < 1/n).
        let cutoff = (1.0 - self.top_p) / (probs.len().max(2) - 1) as f32;
        let best = argmax(&probs) as usize;
        let mut ranked: Vec<(usize, f32)> = probs
            .iter()
            .copied()
            .enumerate()
            .filter(|&(i, p)| p >= cutoff || i == best)
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut mass = 0.0;
        let mut keep = ranked.len();
        for (i, &(_, p)) in ranked.iter().enumerate() {
            mass += p;
            if mass > self.top_p {
                keep = i + 1;
                break;
            }
        }
        sample_cdf(ranked[..keep].iter().copied(), coin, mass)
    }
}

/// The first index whose cumulative probability exceeds `coin * total`
/// (the last one if rounding leaves the coin above the sum).
fn sample_cdf(items: impl Iterator<Item = (usize, f32)>, coin: f32, total: f32) -> u32 {
    let target = coin * total;
    let mut cdf = 0.0;
    let mut last = 0;
    for (id, p) in items {
        cdf += p;
        last = id;
        if target < cdf {
            break;
        }
    }
    last as u32
}

/// Index of the largest value; ties go to the lowest index. NaNs are never
/// the largest, except a NaN first value, whose index is returned.
pub fn argmax(values: &[f32]) -> u32 {
    let Some(&first) = values.first().filter(|v| !v.is_nan()) else {
        return 0;
    };
    // The largest value in sixteen lanes, then the first chunk holding it:
    // both loops vectorize (a running index would not), and greedy decoding
    // takes the argmax of the whole vocabulary every token.
    crate::math::simd(
        #[inline(always)]
        || {
            let chunks = values.chunks_exact(DOT_LANES);
            let mut lanes = [first; DOT_LANES];
            for chunk in chunks.clone() {
                for (m, &v) in lanes.iter_mut().zip(chunk) {
                    *m = if v > *m { v } else { *m };
                }
            }
            let mut max = lanes
                .into_iter()
                .fold(first, |m, v| if v > m { v } else { m });
            for &v in chunks.remainder() {
                max = if v > max { v } else { max };
            }
            let at = chunks
                .clone()
                .position(|chunk| chunk.iter().fold(false, |hit, &v| hit | (v == max)))
                .map_or(values.len() / DOT_LANES * DOT_LANES, |c| c * DOT_LANES);
            (at + values[at..].iter().position(|&v| v == max).unwrap_or(0)) as u32
        },
    )
}

/// In-place numerically stable softmax.
fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // In `math::simd`: `exp`'s fused multiply-adds become instructions.
    crate::math::simd(
        #[inline(always)]
        || {
            let mut sum = 0.0;
            for v in x.iter_mut() {
                *v = crate::math::exp(*v - max);
                sum += *v;
            }
            x.iter_mut().for_each(|v| *v /= sum);
        },
    );
}

/// `x * w / rms(x)` with `rms = sqrt(mean(x^2) + eps)`.
fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// Independent partial sums in [`dot`]: one 512-bit register's lanes (two
/// 256-bit ones with AVX2), so the loop vectorizes and its additions overlap.
const DOT_LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; DOT_LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(DOT_LANES), b.chunks_exact(DOT_LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for k in 0..DOT_LANES {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out[i] = dot(rows[i], x)`, compiled for the CPU's widest vectors.
fn dot_rows(out: &mut [f32], rows: &[f32], x: &[f32]) {
    crate::math::simd(
        #[inline(always)]
        || {
            // A `for` loop: `for_each` was not inlined into this function
            // (`perf` found its fold as baseline x86-64 code), losing the
            // vector instructions.
            for (o, row) in out.iter_mut().zip(rows.chunks_exact(x.len())) {
                *o = dot(row, x);
            }
        },
    );
}

/// Matrix-vector products below this many weights run on the calling thread.
const PARALLEL_WEIGHTS: usize = 1 << 16;

/// Weights in a piece of a team loop over rows (16 KiB): each thread takes
/// its range in pieces of this, so a stopped thread holds a loop up by at
/// most one.
const GRAIN_WEIGHTS: usize = 1 << 12;

/// The parts of `range`, rows of matrices of `heights` rows stacked in order:
/// (matrix, its rows, where the part starts in the stack).
fn stacked(
    range: Range<usize>,
    heights: &[usize],
) -> impl Iterator<Item = (usize, Range<usize>, usize)> + '_ {
    let mut top = 0;
    heights.iter().enumerate().filter_map(move |(m, &height)| {
        let (base, lo, hi) = (top, range.start.max(top), range.end.min(top + height));
        top += height;
        (lo < hi).then(|| (m, lo - base..hi - base, lo))
    })
}

/// Per layer: keys and values, each `(positions, kv_dim)`, grown as the context grows.
#[derive(Clone, Debug, Default)]
struct Cache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// The current team loop: with `attention` `(layer, pos)`, attention over
/// the heads (`input` the query); otherwise the products of the first `count`
/// of `mats` (`heights` rows each, stacked) with `input`.
#[derive(Debug)]
struct Job<'w> {
    attention: Option<(usize, usize)>,
    mats: [&'w [f32]; 3],
    heights: [usize; 3],
    count: usize,
    input: Vec<f32>,
}

/// A worker's results of the current loop: rows at their stacked positions
/// (or attention outputs at their heads'), and the ranges it did.
#[derive(Debug, Default)]
struct WorkerOut {
    rows: Vec<f32>,
    scores: Vec<f32>,
    ranges: Vec<Range<usize>>,
}

/// What the team's workers read: the weights, the KV cache and the current loop.
struct Shared<'w> {
    weights: WeightsView<'w>,
    cache: Vec<RwLock<Cache>>,
    job: RwLock<Job<'w>>,
    /// One per worker (worker 1 first).
    outs: Vec<Mutex<WorkerOut>>,
}

/// A lock's value even if a panicking thread held it (the panic reaches the
/// caller through [`team::scope`] anyway).
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'w> Shared<'w> {
    fn new(weights: WeightsView<'w>) -> Shared<'w> {
        let layers = weights.config().n_layers;
        Shared {
            weights,
            cache: (0..layers).map(|_| RwLock::default()).collect(),
            job: RwLock::new(Job {
                attention: None,
                mats: [&[]; 3],
                heights: [0; 3],
                count: 0,
                input: Vec::new(),
            }),
            outs: Vec::new(),
        }
    }

    /// A worker's part of the current loop: the indices of `pieces`.
    fn work(&self, worker: usize, pieces: &mut team::Pieces) {
        let job = read(&self.job);
        let mut out = lock(&self.outs[worker - 1]);
        let out = &mut *out;
        let c = self.weights.config();
        match job.attention {
            Some((layer, pos)) => {
                out.rows.resize(c.q_dim().max(out.rows.len()), 0.0);
                let cache = read(&self.cache[layer]);
                for heads in pieces {
                    let at = heads.start * c.head_dim..heads.end * c.head_dim;
                    let q = &job.input;
                    attend(
                        &mut out.rows[at],
                        &mut out.scores,
                        q,
                        &cache,
                        heads.clone(),
                        pos,
                        c,
                    );
                    out.ranges.push(heads);
                }
            }
            None => {
                let (x, heights) = (&job.input, &job.heights[..job.count]);
                out.rows
                    .resize(heights.iter().sum::<usize>().max(out.rows.len()), 0.0);
                for range in pieces {
                    for (m, rows, at) in stacked(range.clone(), heights) {
                        let w = &job.mats[m][rows.start * x.len()..rows.end * x.len()];
                        dot_rows(&mut out.rows[at..at + rows.len()], w, x);
                    }
                    out.ranges.push(range);
                }
            }
        }
    }

    /// A team of the pool's size (`--threads`) for `f`, its workers running [`Shared::work`].
    fn with_team<R>(&mut self, f: impl FnOnce(&Shared<'w>, &Team) -> R) -> R {
        let threads = rayon::current_num_threads().max(1);
        self.outs.resize_with(threads - 1, Mutex::default);
        let shared = &*self;
        team::scope(
            threads,
            |worker, range| shared.work(worker, range),
            |t| f(shared, t),
        )
    }
}

/// `outs[i] = mats[i] x` for `N` (at most 3) products over the same `x`, in
/// one team loop over their stacked rows: the caller writes its rows in
/// place and copies in the workers' afterwards. Small products run on the
/// calling thread.
fn matvecs<'w, const N: usize>(
    team: &Team,
    shared: &Shared<'w>,
    mut outs: [&mut [f32]; N],
    mats: [&'w [f32]; N],
    x: &[f32],
) {
    let n = x.len();
    let heights = outs.each_ref().map(|out| out.len());
    for (h, w) in heights.iter().zip(&mats) {
        debug_assert_eq!(w.len(), h * n);
    }
    let weights: usize = mats.iter().map(|w| w.len()).sum();
    if weights < PARALLEL_WEIGHTS || team.threads() == 1 {
        for (out, w) in outs.iter_mut().zip(mats) {
            dot_rows(out, w, x);
        }
        return;
    }
    {
        let mut job = write(&shared.job);
        job.attention = None;
        job.mats[..N].copy_from_slice(&mats);
        job.heights[..N].copy_from_slice(&heights);
        job.count = N;
        job.input.clear();
        job.input.extend_from_slice(x);
    }
    let total = heights.iter().sum();
    team.run(total, (GRAIN_WEIGHTS / n).max(1), |range| {
        for (m, rows, _) in stacked(range, &heights) {
            dot_rows(
                &mut outs[m][rows.clone()],
                &mats[m][rows.start * n..rows.end * n],
                x,
            );
        }
    });
    for out in &shared.outs {
        let mut out = lock(out);
        let WorkerOut { rows, ranges, .. } = &mut *out;
        for range in ranges.drain(..) {
            for (m, part, at) in stacked(range, &heights) {
                outs[m][part.clone()].copy_from_slice(&rows[at..at + part.len()]);
            }
        }
    }
}

/// Attention of the query heads `heads` at position `pos` (the cache holds
/// positions `0..=pos`) into `out` (`heads.len() * head_dim`), with `scores`
/// as scratch.
fn attend(
    out: &mut [f32],
    scores: &mut Vec<f32>,
    q: &[f32],
    cache: &Cache,
    heads: Range<usize>,
    pos: usize,
    c: &ModelConfig,
) {
    let (hd, kv_dim, group) = (c.head_dim, c.kv_dim(), c.gqa_ratio());
    let scale = 1.0 / (hd as f32).sqrt();
    scores.resize(pos + 1, 0.0);
    crate::math::simd(
        #[inline(always)]
        || {
            for (head, out) in heads.zip(out.chunks_exact_mut(hd)) {
                let kv_off = (head / group) * hd;
                let q_head = &q[head * hd..(head + 1) * hd];
                for (t, s) in scores.iter_mut().enumerate() {
                    *s = dot(q_head, &cache.keys[t * kv_dim + kv_off..][..hd]) * scale;
                }
                softmax(scores);
                out.fill(0.0);
                for (t, &a) in scores.iter().enumerate() {
                    let v = &cache.values[t * kv_dim + kv_off..][..hd];
                    out.iter_mut().zip(v).for_each(|(o, &v)| *o += a * v);
                }
            }
        },
    )
}

/// [`attend`] over every head of layer `layer` at `pos` into `out`, in a team loop over the heads.
fn attention(
    team: &Team,
    shared: &Shared<'_>,
    (layer, pos): (usize, usize),
    out: &mut [f32],
    scores: &mut Vec<f32>,
    q: &[f32],
) {
    let c = shared.weights.config();
    let hd = c.head_dim;
    if team.threads() > 1 {
        let mut job = write(&shared.job);
        job.attention = Some((layer, pos));
        job.input.clear();
        job.input.extend_from_slice(q);
    }
    let cache = read(&shared.cache[layer]);
    team.run(c.n_heads, 1, |heads| {
        let at = heads.start * hd..heads.end * hd;
        attend(&mut out[at], scores, q, &cache, heads, pos, c);
    });
    for worker in &shared.outs {
        let mut worker = lock(worker);
        let WorkerOut { rows, ranges, .. } = &mut *worker;
        for heads in ranges.drain(..) {
            let at = heads.start * hd..heads.end * hd;
            out[at.clone()].copy_from_slice(&rows[at]);
        }
    }
}

/// RMSNorm of every head of `x` (`head_dim` values each) in place, times `weight` (QK-norm).
fn head_rmsnorm(x: &mut [f32], weight: &[f32], eps: f32) {
    let mut normed = vec![0.0; weight.len()];
    for head in x.chunks_exact_mut(weight.len()) {
        rmsnorm(&mut normed, head, weight, eps);
        head.copy_from_slice(&normed);
    }
}

/// `x += bias` when the model has the bias.
fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        x.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
    }
}

/// Rotate interleaved pairs `(x[2i], x[2i+1])` of every head by `pos * freq_i`.
fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos[i] - b * sin[i];
            pair[1] = a * sin[i] + b * cos[i];
        }
    }
}

/// A decoder over borrowed weights (a [`Weights`] vector, or a llama2.c file's
/// tensors in a memory map: [`WeightsView`]) with its KV cache and scratch buffers.
/// The cache grows with the positions used, never to the model's `seq_len`
/// up front: a model file's context, however large, costs nothing until
/// tokens fill it. Its parallel loops (the matrix-vector products, attention
/// over the heads) run on a [`team`] of the pool's size (`--threads`), kept
/// for a whole [`Generator::generate`].
pub struct Generator<'w> {
    shared: Shared<'w>,
    state: State,
    /// Tokens that end [`Generator::generate`].
    stop: Vec<u32>,
}

/// The calling thread's part of a [`Generator`].
struct State {
    /// Next position to fill.
    pos: usize,
    /// `(head_dim / 2)` RoPE inverse frequencies, and the current position's cos/sin.
    rope_inv_freq: Vec<f64>,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    x: Vec<f32>,      // (C) residual stream
    xn: Vec<f32>,     // (C) normed
    q: Vec<f32>,      // (Hq*D)
    attn: Vec<f32>,   // (Hq*D) attention output
    proj: Vec<f32>,   // (C) wo / w2 output
    h1: Vec<f32>,     // (F)
    h3: Vec<f32>,     // (F)
    logits: Vec<f32>, // (V)
    /// Attention weights of one head at the current position.
    scores: Vec<f32>,
}

impl<'w> Generator<'w> {
    pub fn new(weights: &'w Weights) -> Generator<'w> {
        Generator::from_view(weights.view())
    }

    /// A decoder over tensors borrowed from anywhere ([`WeightsView`]).
    pub fn from_view(weights: WeightsView<'w>) -> Generator<'w> {
        let c = weights.config().clone();
        let half = c.head_dim / 2;
        Generator {
            shared: Shared::new(weights),
            state: State {
                pos: 0,
                rope_inv_freq: c.rope_inv_freq(),
                rope_cos: vec![0.0; half],
                rope_sin: vec![0.0; half],
                x: vec![0.0; c.dim],
                xn: vec![0.0; c.dim],
                q: vec![0.0; c.q_dim()],
                attn: vec![0.0; c.q_dim()],
                proj: vec![0.0; c.dim],
                h1: vec![0.0; c.hidden_dim],
                h3: vec![0.0; c.hidden_dim],
                logits: vec![0.0; c.vocab_size],
                scores: Vec::new(),
            },
            stop: STOP_TOKENS.to_vec(),
        }
    }

    /// Number of tokens in the KV cache.
    pub fn position(&self) -> usize {
        self.state.pos
    }

    /// End [`Generator::generate`] at any of `ids` (default [`STOP_TOKENS`]).
    pub fn set_stop_tokens(&mut self, ids: &[u32]) {
        self.stop = ids.to_vec();
    }

    /// Forget the context (the cache is overwritten, not cleared).
    pub fn reset(&mut self) {
        self.state.pos = 0;
    }

    /// Feed `token` at the next position; returns the logits `(V)` for the
    /// token after it. Starts a team for this token alone: [`Generator::generate`]
    /// and [`Generator::forward_logits`] keep one for all their tokens.
    pub fn forward(&mut self, token: u32) -> Result<&[f32]> {
        let state = &mut self.state;
        self.shared
            .with_team(|shared, team| state.advance(shared, team, token))?;
        Ok(&self.state.logits)
    }

    /// Logits after every token of `tokens`, from an empty context (resets the cache).
    pub fn forward_logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.reset();
        let state = &mut self.state;
        self.shared.with_team(|shared, team| {
            tokens
                .iter()
                .map(|&t| {
                    state.advance(shared, team, t)?;
                    Ok(state.logits.clone())
                })
                .collect()
        })
    }

    /// Generate up to `max_tokens` tokens after `prompt` (which should start
    /// with [`BOS`]), from an empty context. Stops before emitting a stop
    /// token ([`BOS`], [`EOS`] or those set by [`Generator::set_stop_tokens`];
    /// the document ends there) or when the context reaches `seq_len` (at most
    /// `seq_len - prompt.len() + 1` new tokens). Calls `on_token` with each new
    /// id as it is sampled and returns the new ids (prompt and stop excluded).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        let stop = self.stop.clone();
        self.generate_until(prompt, max_tokens, sampler, &stop, on_token)
    }

    /// [`Generator::generate`] stopping before any of the ids `stop` (a Hugging
    /// Face model's `eos_token_id` list) instead of the generator's stop tokens.
    pub fn generate_until(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        stop: &[u32],
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        let seq_len = self.shared.weights.config().seq_len;
        let (&last, context) = prompt.split_last().ok_or_else(|| {
            Error::Invalid("generate: the prompt is empty; start it with the BOS token (1)".into())
        })?;
        if prompt.len() > seq_len {
            return Err(Error::Invalid(format!(
                "generate: the prompt has {} tokens but the model's seq_len is {seq_len}",
                prompt.len()
            )));
        }
        self.reset();
        let state = &mut self.state;
        self.shared.with_team(|shared, team| {
            for &token in context {
                state.advance(shared, team, token)?;
            }
            let mut next_input = last;
            let mut out = Vec::new();
            while out.len() < max_tokens && state.pos < seq_len {
                state.advance(shared, team, next_input)?;
                let token = sampler.sample(&state.logits);
                if stop.contains(&token) {
                    break;
                }
                on_token(token);
                out.push(token);
                next_input = token;
            }
            Ok(out)
        })
    }
}

impl State {
    /// Feed `token` at the next position: the logits of the token after it
    /// in `self.logits`.
    fn advance(&mut self, shared: &Shared<'_>, team: &Team, token: u32) -> Result<()> {
        let w = &shared.weights;
        let c = w.config();
        if token as usize >= c.vocab_size {
            return Err(Error::Invalid(format!(
                "generate: token id {token} is outside the model's vocabulary of {}",
                c.vocab_size
            )));
        }
        if self.pos >= c.seq_len {
            return Err(Error::Invalid(format!(
                "generate: context is full ({} tokens = the model's seq_len)",
                c.seq_len
            )));
        }
        let (pos, d, hd, kv_dim) = (self.pos, c.dim, c.head_dim, c.kv_dim());
        let (cos, sin) = (&mut self.rope_cos, &mut self.rope_sin);
        crate::model::rope::angles_at(pos, &self.rope_inv_freq, cos, sin);
        let (cos, sin) = (&self.rope_cos[..], &self.rope_sin[..]);
        for cache in &shared.cache {
            let Cache { keys, values } = &mut *write(cache);
            for rows in [keys, values] {
                if rows.len() < (pos + 1) * kv_dim {
                    rows.resize((pos + 1) * kv_dim, 0.0);
                }
            }
        }
        let token = token as usize;
        self.x
            .copy_from_slice(&w.get(Param::Embedding)[token * d..(token + 1) * d]);
        for layer in 0..c.n_layers {
            // Attention block.
            rmsnorm(
                &mut self.xn,
                &self.x,
                w.get(Param::RmsAtt(layer)),
                c.norm_eps,
            );
            let optional = |p: Param| w.optional(p);
            let norms = optional(Param::QNorm(layer)).zip(optional(Param::KNorm(layer)));
            {
                let mut cache = write(&shared.cache[layer]);
                let Cache { keys, values } = &mut *cache;
                let key_row = &mut keys[pos * kv_dim..(pos + 1) * kv_dim];
                let value_row = &mut values[pos * kv_dim..(pos + 1) * kv_dim];
                matvecs(
                    team,
                    shared,
                    [&mut self.q, &mut *key_row, &mut *value_row],
                    [
                        w.get(Param::Wq(layer)),
                        w.get(Param::Wk(layer)),
                        w.get(Param::Wv(layer)),
                    ],
                    &self.xn,
                );
                add_bias(&mut self.q, optional(Param::Bq(layer)));
                add_bias(key_row, optional(Param::Bk(layer)));
                add_bias(value_row, optional(Param::Bv(layer)));
                if let Some((q_norm, k_norm)) = norms {
                    head_rmsnorm(&mut self.q, q_norm, c.norm_eps);
                    head_rmsnorm(key_row, k_norm, c.norm_eps);
                }
                rope(key_row, hd, cos, sin);
                rope(&mut self.q, hd, cos, sin);
            }
            let (attn, scores) = (&mut self.attn, &mut self.scores);
            attention(team, shared, (layer, pos), attn, scores, &self.q);
            let wo = w.get(Param::Wo(layer));
            matvecs(team, shared, [&mut self.proj], [wo], &self.attn);
            self.x.iter_mut().zip(&self.proj).for_each(|(x, p)| *x += p);

            // Feed-forward block: w2(silu(w1 x) * w3 x).
            rmsnorm(
                &mut self.xn,
                &self.x,
                w.get(Param::RmsFfn(layer)),
                c.norm_eps,
            );
            matvecs(
                team,
                shared,
                [&mut self.h1, &mut self.h3],
                [w.get(Param::W1(layer)), w.get(Param::W3(layer))],
                &self.xn,
            );
            crate::math::simd(
                #[inline(always)]
                || {
                    for (a, &b) in self.h1.iter_mut().zip(&self.h3) {
                        *a = *a * crate::math::sigmoid(*a) * b;
                    }
                },
            );
            let w2 = w.get(Param::W2(layer));
            matvecs(team, shared, [&mut self.proj], [w2], &self.h1);
            self.x.iter_mut().zip(&self.proj).for_each(|(x, p)| *x += p);
        }
        rmsnorm(&mut self.xn, &self.x, w.get(Param::RmsFinal), c.norm_eps);
        let classifier = w.classifier();
        matvecs(team, shared, [&mut self.logits], [classifier], &self.xn);
        self.pos += 1;
        Ok(())
    }
}

/// An output error: the stream has no path, so name the output.
fn output_error(source: std::io::Error) -> Error {
    Error::io("the output", source)
}

/// How fast [`stream`] or [`stream_hf`] generated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// New tokens per second, from the decoder's start (the prompt included)
    /// to the last token.
    pub tokens_per_s: f64,
    /// New tokens after the first per second after the first: the span
    /// llama2.c's `run.c` reports as `achieved tok/s` (its timer starts after
    /// the first forward pass); `None` with fewer than two new tokens.
    pub after_first_per_s: Option<f64>,
    /// Seconds from the decoder's start to the first new token.
    pub first_token_s: Option<f64>,
}

impl Rate {
    /// The rates of `new` tokens generated from `started`, the first of them
    /// at `first` (if any), ending now.
    fn measure(new: usize, started: Instant, first: Option<Instant>) -> Rate {
        let now = Instant::now();
        let seconds = |from: Instant| now.duration_since(from).as_secs_f64().max(1e-9);
        Rate {
            tokens_per_s: new as f64 / seconds(started),
            after_first_per_s: first
                .filter(|_| new >= 2)
                .map(|first| (new - 1) as f64 / seconds(first)),
            first_token_s: first.map(|first| first.duration_since(started).as_secs_f64()),
        }
    }
}

/// Generate from the text `prompt` (empty: from [`BOS`] alone), writing the
/// prompt and then each new token's text to `out` as it is sampled; returns
/// the new ids and the rate.
pub fn stream(
    weights: WeightsView<'_>,
    tokenizer: &Tokenizer,
    prompt: &str,
    max_tokens: usize,
    sampler: &mut Sampler,
    out: &mut dyn Write,
) -> Result<(Vec<u32>, Rate)> {
    let mut ids = vec![BOS];
    if !prompt.is_empty() {
        ids = tokenizer.encode(prompt, true, false);
    }
    let mut generator = Generator::from_view(weights);
    let started = Instant::now();
    let mut first = None;
    let mut prev = *ids.last().expect("BOS");
    write!(out, "{prompt}").map_err(output_error)?;
    let mut failure = None;
    let new = generator.generate(&ids, max_tokens, sampler, |id| {
        first.get_or_insert_with(Instant::now);
        match tokenizer.decode_token(Some(prev), id) {
            Ok(bytes) => {
                let _ = out.write_all(bytes);
                let _ = out.flush();
            }
            Err(e) => failure = Some(e),
        }
        prev = id;
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    let rate = Rate::measure(new.len(), started, first);
    Ok((new, rate))
}

/// The text side of a Hugging Face model: its `tokenizer.json`, chat
/// template, BOS and the ids that end generation (the model's
/// `eos_token_id`s from `generation_config.json`/`config.json`, then the
/// tokenizer's EOS).
#[derive(Debug)]
pub struct HfText {
    pub tokenizer: HfTokenizer,
    /// The template of the tokenizer's directory, if it has one.
    pub template: Option<ChatTemplate>,
    pub bos: Option<u32>,
    pub stop: Vec<u32>,
}

impl HfText {
    /// The tokenizer at `tokenizer` (a directory or a `tokenizer.json`,
    /// [`HfTokenizer::open_path`]) for the model at `model` (a model
    /// directory, a run made from one, or any model file) of `vocab_size`
    /// rows: every tokenizer id must be a row of the model.
    pub fn open(tokenizer: &Path, model: &Path, vocab_size: usize) -> Result<HfText> {
        let hf_tokenizer = HfTokenizer::open_path(tokenizer)?;
        let template_dir = if tokenizer.is_dir() {
            Some(tokenizer)
        } else {
            tokenizer.parent()
        };
        let template = match template_dir {
            Some(dir) if !dir.as_os_str().is_empty() => ChatTemplate::open(dir)?,
            _ => ChatTemplate::open(Path::new("."))?,
        };
        let base = base_config(model)?;
        let config_path = base
            .as_ref()
            .map_or(model.to_path_buf(), |b| b.path.clone());
        hf_tokenizer.check_fits(vocab_size, &config_path)?;
        let model_eos = base
            .as_ref()
            .map(|b| b.eos_token_ids.clone())
            .unwrap_or_default();
        let bos = hf_tokenizer
            .bos_token_id()
            .or(base.as_ref().and_then(|b| b.bos_token_id));
        Ok(HfText {
            stop: hf_tokenizer.stop_token_ids(&model_eos),
            tokenizer: hf_tokenizer,
            template,
            bos,
        })
    }

    /// The prompt's ids. With `chat` (`Some(system prompt)`), the chat
    /// template renders `[system?, user: prompt]` with the generation prompt,
    /// and the text is encoded without adding special tokens (as
    /// `apply_chat_template(..., tokenize=True)` does); otherwise the prompt
    /// is encoded as a text (with the post-processor's special tokens), an
    /// empty one as BOS alone.
    pub fn prompt_ids(&self, prompt: &str, chat: Option<Option<&str>>) -> Result<Vec<u32>> {
        let Some(system) = chat else {
            let ids = self.tokenizer.encode(prompt, true)?;
            if !ids.is_empty() {
                return Ok(ids);
            }
            return self.bos.map(|bos| vec![bos]).ok_or_else(|| {
                Error::Invalid(format!(
                    "generate: the prompt is empty and {} has no BOS token to start from
                     hint: give a --prompt",
                    self.tokenizer.path().display()
                ))
            });
        };
        let template = self.template.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "--chat: no chat template beside {} (neither chat_template.jinja nor                  tokenizer_config.json's chat_template)
hint: drop --chat, or use an                  instruction-tuned model's directory",
                self.tokenizer.path().display()
            ))
        })?;
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", prompt));
        let text = template.render(&messages, true, &serde_json::Map::new())?;
        self.tokenizer.encode(&text, false)
    }
}

/// Generate after the prompt `ids` with a Hugging Face tokenizer, stopping
/// before any of `text.stop`, writing `echo` (the prompt's text, or nothing
/// for a chat) and then the new text as it is sampled (special tokens left
/// out); returns the new ids and the rate.
pub fn stream_hf(
    weights: WeightsView<'_>,
    text: &HfText,
    ids: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    echo: &str,
    out: &mut dyn Write,
) -> Result<(Vec<u32>, Rate)> {
    let mut generator = Generator::from_view(weights);
    let started = Instant::now();
    let mut first = None;
    write!(out, "{echo}").map_err(output_error)?;
    // New tokens are written in pieces that decode to whole characters (a
    // character's bytes may span tokens). A piece's text is what decoding it
    // after the token before it adds to decoding that token alone, so text
    // that depends on what precedes it (SentencePiece's leading space) comes
    // out as in the whole text.
    let mut context = *ids
        .last()
        .ok_or_else(|| Error::Invalid("generate: the prompt is empty; give a --prompt".into()))?;
    let piece = |context: u32, pending: &[u32]| -> Result<String> {
        let before = text.tokenizer.decode(&[context], true)?;
        let mut with_context = vec![context];
        with_context.extend_from_slice(pending);
        let decoded = text.tokenizer.decode(&with_context, true)?;
        match decoded.strip_prefix(before.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => text.tokenizer.decode(pending, true),
        }
    };
    let mut pending = Vec::new();
    let mut failure = None;
    let new = generator.generate_until(ids, max_tokens, sampler, &text.stop, |id| {
        first.get_or_insert_with(Instant::now);
        pending.push(id);
        match piece(context, &pending) {
            Ok(piece) if !piece.ends_with('\u{FFFD}') => {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
                context = id;
                pending.clear();
            }
            Ok(_) => {} // an incomplete character: wait for its next bytes
            Err(e) => failure = Some(e),
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    // Bytes that never got the rest of their character: written as decoding
    // writes them (replacement characters).
    if !pending.is_empty() {
        out.write_all(piece(context, &pending)?.as_bytes())
            .map_err(output_error)?;
    }
    let rate = Rate::measure(new.len(), started, first);
    Ok((new, rate))
}

/// Prompts of the main job's samples, used in turn.
const SAMPLE_PROMPTS: [&str; 3] = ["Once upon a time", "One day, a little", "Lily and her dog"];

/// The main job's closing samples: `n` stories of up to 200 tokens at
/// temperature 0.7, top-p 0.9 (seeds `seed`, `seed + 1`, ...), each under a
/// `--- sample i ---` line.
pub fn samples(
    weights: &Weights,
    tokenizer_path: &Path,
    n: usize,
    seed: u64,
    out: &mut dyn Write,
) -> Result<()> {
    let tokenizer = Tokenizer::read(tokenizer_path, Some(weights.config().vocab_size))?;
    for i in 0..n {
        let mut sampler = Sampler::new(0.7, 0.9, seed + i as u64);
        writeln!(out, "\n--- sample {} ---", i + 1).map_err(output_error)?;
        let prompt = SAMPLE_PROMPTS[i % SAMPLE_PROMPTS.len()];
        stream(weights.view(), &tokenizer, prompt, 200, &mut sampler, out)?;
        writeln!(out).map_err(output_error)?;
    }
    Ok(())
}

/// The `tokenizer.bin` of a run directory, or the one beside a model file.
pub fn tokenizer_beside(model: &Path) -> Result<PathBuf> {
    let dir = if model.is_dir() {
        model
    } else {
        model.parent().unwrap_or(Path::new("."))
    };
    let candidate = dir.join("tokenizer.bin");
    if candidate.exists() {
        Ok(candidate)
    } else {
        Err(Error::Invalid(format!(
            "no tokenizer found beside {} (hint: pass --tokenizer tokenizer.bin)",
            model.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_ties_go_to_the_lowest_id() {
        assert_eq!(argmax(&[0.0, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[2.0, 2.0]), 0);
    }

    #[test]
    fn rmsnorm_matches_hand_values() {
        // x = (3, 4): mean square 12.5, scale 1/sqrt(12.5 + eps).
        let mut out = [0.0; 2];
        rmsnorm(&mut out, &[3.0, 4.0], &[1.0, 2.0], 0.0);
        let s = 1.0 / 12.5f32.sqrt();
        assert!((out[0] - 3.0 * s).abs() < 1e-6 && (out[1] - 8.0 * s).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_interleaved_pairs() {
        // One head of width 4: pair 0 rotated by 90 degrees, pair 1 by 0.
        let mut x = [1.0, 2.0, 3.0, 4.0];
        rope(&mut x, 4, &[0.0, 1.0], &[1.0, 0.0]);
        assert_eq!(x, [-2.0, 1.0, 3.0, 4.0]);
    }

    #[test]
    fn fused_parallel_products_equal_the_serial_rows_bit_for_bit() {
        let mut rng = Rng::new(3);
        let cols = 301;
        let shapes = [300, 7, 301];
        let ws: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&rows| (0..rows * cols).map(|_| rng.normal()).collect())
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
        let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&rows| vec![0.0; rows]).collect();
        let [a, b, c] = &mut outs[..] else {
            unreachable!()
        };
        let tiny = Weights::init(&ModelConfig::llama(8, 1, 2, 2, 16, 32, 4), 1);
        let mut shared = Shared::new(tiny.view());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let mats = [&ws[0][..], &ws[1], &ws[2]];
        pool.install(|| {
            shared.with_team(|shared, team| matvecs(team, shared, [a, b, c], mats, &x))
        });
        for ((out, w), &rows) in outs.iter().zip(&ws).zip(&shapes) {
            let mut serial = vec![0.0; rows];
            dot_rows(&mut serial, w, &x);
            assert_eq!(
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                serial.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            for (r, &o) in out.iter().enumerate() {
                let reference: f64 = (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[c] as f64)
                    .sum();
                assert!(
                    (o as f64 - reference).abs() < 1e-3,
                    "row {r}: {o} vs {reference}"
                );
            }
        }
    }

    #[test]
    fn a_team_of_threads_gives_the_logits_of_one_bit_for_bit() {
        // Large enough that attention and all products but wo are team loops (GQA too).
        let config = ModelConfig::llama(192, 2, 6, 3, 512, 1000, 64);
        let weights = Weights::init(&config, 7);
        let tokens = [1, 50, 999, 3, 3, 17, 200, 5, 1, 2];
        let logits = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let logits = pool.install(|| Generator::new(&weights).forward_logits(&tokens));
            let logits = logits.unwrap().concat();
            logits.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let one = logits(1);
        assert!(one.iter().any(|&v| v != 0));
        for threads in [2, 3] {
            assert_eq!(logits(threads), one, "{threads} threads");
        }
    }

    /// The plain scan [`argmax`] replaces.
    fn first_largest(values: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &v) in values.iter().enumerate() {
            if v > values[best] {
                best = i;
            }
        }
        best as u32
    }

    #[test]
    fn argmax_equals_the_plain_scan() {
        let mut rng = Rng::new(5);
        for len in [1, 15, 16, 17, 100, 32000] {
            let mut v: Vec<f32> = (0..len).map(|_| rng.normal()).collect();
            assert_eq!(argmax(&v), first_largest(&v), "{len}");
            // Ties, NaNs and signed zeros, in the vector part and the tail.
            v.iter_mut().for_each(|x| *x = x.round().min(1.0));
            assert_eq!(argmax(&v), first_largest(&v), "{len} ties");
            v[len / 2] = f32::NAN;
            assert_eq!(argmax(&v), first_largest(&v), "{len} NaN");
            v.iter_mut()
                .for_each(|x| *x = if *x > 0.0 { -0.0 } else { *x });
            assert_eq!(argmax(&v), first_largest(&v), "{len} zeros");
            v[0] = f32::NAN;
            assert_eq!(argmax(&v), 0, "{len} NaN first");
        }
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
    }
}
