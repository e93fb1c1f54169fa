//! `anemone doctor`: print what this machine offers the ANE backend (see
//! `anemone::doctor`) and optionally write the report as JSON to share.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use clap::builder::RangedU64ValueParser;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Also write the report as JSON to this file (please share it: see the README)
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Model whose training kernels are compared (preset, JSON config or
    /// Hugging Face model directory)
    #[arg(long, default_value = "tiny")]
    pub config: String,
    /// Window length of the compared kernels (default: the model's seq_len, at most 128)
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub seq: Option<usize>,
}

pub fn doctor(args: DoctorArgs) -> Result<()> {
    let seq = match args.seq {
        Some(s) => s,
        None => anemone::model::ModelConfig::from_name_or_file(&args.config)?
            .seq_len
            .min(128),
    };
    let report = anemone::doctor::run(&args.config, seq)?;
    print!("{}", anemone::doctor::format(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report)?;
        anemone::atomic::write_atomic(path, &json)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
