fn main() {
    let n = 3_145_728;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * -0.01).collect();
    let mut y = x.clone();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        y.copy_from_slice(&x);
        anemone::math::exp_in_place(&mut y);
        println!(
            "math::exp {:.2} ns/elem",
            t.elapsed().as_secs_f64() * 1e9 / n as f64
        );
        let t = std::time::Instant::now();
        for (o, v) in y.iter_mut().zip(&x) {
            *o = v.exp();
        }
        println!(
            "libm {:.2} ns/elem",
            t.elapsed().as_secs_f64() * 1e9 / n as f64
        );
    }
    println!("{}", y[5]);
}
