//! criterion benchmarks of the CPU hot paths, so regressions show up:
//! host GEMM shapes of a training step (platform-notes), RMSNorm forward and
//! backward, softmax and the `attn_fwd` kernel through the CPU backend, one
//! AdamW step, and weight-sized transposes. Public APIs only; throughput is in
//! FLOPs (reported as elem/s) or bytes where FLOPs mean little.
//!
//! Run: `cargo bench --bench hot` (all) or `cargo bench --bench hot -- gemm` (a group).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use anemone::backend::cpu::CpuBackend;
use anemone::backend::{Backend, Block, BufferId, KernelId, Precision};
use anemone::linalg::{gemm, n, t, transpose_into};
use anemone::mil::{Builder, DType, Dialect};
use anemone::model::host::{rmsnorm_backward, rmsnorm_forward};
use anemone::model::kernels::{KernelOptions, LayerKernels};
use anemone::model::{ModelConfig, Weights};
use anemone::package::ProgramPackage;
use anemone::rng::Rng;
use anemone::train::optim::{AdamState, AdamW};

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

/// `(name, M, K, N, a transposed, b transposed)`: the shapes of platform-notes.
const GEMMS: &[(&str, usize, usize, usize, bool, bool)] = &[
    ("768x768x256 NN", 768, 768, 256, false, false),
    ("2048x768x256 NN", 2048, 768, 256, false, false),
    ("32000x768x256 NN", 32000, 768, 256, false, false),
    ("768x768x256 TN", 768, 768, 256, true, false),
    ("768x256x768 NT", 768, 256, 768, false, true),
];

fn bench_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    for &(name, m, k, nn, a_t, b_t) in GEMMS {
        let a = random(m * k, 1);
        let b = random(k * nn, 2);
        let mut out = vec![0.0f32; m * nn];
        group.throughput(Throughput::Elements((2 * m * k * nn) as u64));
        group.bench_function(name, |bench| {
            bench.iter(|| {
                let lhs = if a_t { t(&a, k, m) } else { n(&a, m, k) };
                let rhs = if b_t { t(&b, nn, k) } else { n(&b, k, nn) };
                gemm(&mut out, m, nn, lhs, rhs, 1.0, false);
                black_box(&out);
            })
        });
    }
    group.finish();
}

fn bench_rmsnorm(c: &mut Criterion) {
    let (dim, seq) = (768, 256);
    let x = random(dim * seq, 1);
    let w = random(dim, 2);
    let dy = random(dim * seq, 3);
    let (mut y, mut rrms) = (vec![0.0f32; dim * seq], vec![0.0f32; seq]);
    let (mut dx, mut dw) = (vec![0.0f32; dim * seq], vec![0.0f32; dim]);
    let mut group = c.benchmark_group("rmsnorm");
    group.throughput(Throughput::Bytes((dim * seq * 4) as u64));
    group.bench_function("forward 768x256", |b| {
        b.iter(|| rmsnorm_forward(&mut y, &mut rrms, &x, &w, 1e-5))
    });
    rmsnorm_forward(&mut y, &mut rrms, &x, &w, 1e-5);
    group.bench_function("backward 768x256", |b| {
        b.iter(|| rmsnorm_backward(&mut dx, Some(&mut dw), &dy, &x, &w, &rrms))
    });
    group.finish();
}

/// A package compiled on `cpu` with random inputs and allocated outputs.
fn load(
    cpu: &mut CpuBackend,
    package: &ProgramPackage,
) -> (KernelId, Vec<BufferId>, Vec<BufferId>) {
    let kernel = cpu.compile(package).expect("benchmark kernel compiles");
    let info = cpu.kernel_info(kernel).clone();
    let inputs = info
        .inputs
        .iter()
        .enumerate()
        .map(|(i, var)| {
            let buf = cpu.alloc(&var.ty).unwrap();
            let values = random(var.ty.numel(), 10 + i as u64);
            cpu.write(buf, Block::whole(&var.ty), &values).unwrap();
            buf
        })
        .collect();
    let outputs = info
        .outputs
        .iter()
        .map(|var| cpu.alloc(&var.ty).unwrap())
        .collect();
    (kernel, inputs, outputs)
}

fn bench_softmax(c: &mut Criterion) {
    let (heads, seq) = (12, 256);
    let mut b = Builder::new(Dialect::Ios18);
    let x = b.input("x", DType::Fp32, &[1, heads, seq, seq]);
    let y = b.softmax(&x, -1);
    b.output(&y);
    let package = ProgramPackage::from_program(&b.finish(), Vec::new());
    let mut cpu = CpuBackend::new(Precision::Fp32);
    let (kernel, inputs, outputs) = load(&mut cpu, &package);
    let mut group = c.benchmark_group("softmax");
    group.throughput(Throughput::Bytes((heads * seq * seq * 4) as u64));
    group.bench_function("cpu backend [1,12,256,256] axis -1", |bench| {
        bench.iter(|| cpu.run(kernel, &inputs, &outputs).unwrap())
    });
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    // layer768's shape (dim 768, 12 heads) at 256 positions, weights as inputs.
    let config = ModelConfig::preset("layer768").expect("preset");
    let seq = 256;
    let kernels =
        LayerKernels::build(&config, seq, KernelOptions::cpu(), &|_| None).expect("kernels build");
    let mut cpu = CpuBackend::new(Precision::Fp32);
    let (kernel, inputs, outputs) = load(&mut cpu, &kernels.attn_fwd.package);
    let (d, q) = (config.dim, config.q_dim());
    let flops = 2 * seq * d * (q + 2 * config.kv_dim()) + 4 * seq * seq * q;
    let mut group = c.benchmark_group("attention");
    group.throughput(Throughput::Elements(flops as u64));
    group.bench_function("attn_fwd layer768 T=256 (cpu backend)", |bench| {
        bench.iter(|| cpu.run(kernel, &inputs, &outputs).unwrap())
    });
    group.finish();
}

fn bench_adamw(c: &mut Criterion) {
    let config = ModelConfig::preset("layer768").expect("preset");
    let mut weights = Weights::init(&config, 1);
    let grad = random(weights.data.len(), 2);
    let mut state = AdamState::new(weights.data.len());
    let opt = AdamW::default();
    let mut group = c.benchmark_group("adamw");
    // Read w, g, m, v and write w, m, v: 7 x 4 bytes per parameter.
    group.throughput(Throughput::Bytes((weights.data.len() * 28) as u64));
    group.bench_function(format!("step {} params", weights.data.len()), |b| {
        b.iter(|| opt.step(&mut weights, &grad, &mut state, 3e-4, 1.0))
    });
    group.finish();
}

/// `linalg::transpose_into` on a layer's weight shapes and the classifier's.
fn bench_transpose(c: &mut Criterion) {
    let mut group = c.benchmark_group("transpose");
    for (rows, cols) in [(768, 768), (2048, 768), (768, 2048), (32000, 288)] {
        let src = random(rows * cols, 1);
        let mut dst = vec![0.0f32; rows * cols];
        // Read once and written once: 8 bytes per value.
        group.throughput(Throughput::Bytes((rows * cols * 8) as u64));
        group.bench_function(format!("{rows}x{cols}"), |b| {
            b.iter(|| {
                transpose_into(&src, rows, cols, &mut dst);
                black_box(&dst);
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = hot;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_gemm, bench_rmsnorm, bench_softmax, bench_attention, bench_adamw, bench_transpose
}
criterion_main!(hot);
