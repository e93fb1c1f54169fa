use anemone::model::ModelConfig;
use anemone::model::kernels::{KernelOptions, LayerKernels};
fn main() {
    let c = ModelConfig::preset("layer768").unwrap();
    let k = LayerKernels::build(&c, 512, KernelOptions::cpu(), &|_| None).unwrap();
    for spec in k.all() {
        if spec
            .name
            .starts_with(std::env::args().nth(1).unwrap().as_str())
        {
            println!("{}", anemone::mil::emit(&spec.program));
        }
    }
}
