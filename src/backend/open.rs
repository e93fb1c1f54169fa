//! Which backend to open ([`BackendKind`], the `--backend` names) and
//! [`open`], which opens it: the CPU interpreter, the ANE, or `auto`, the ANE
//! where a probe kernel compiles, runs and matches the CPU.

use std::fmt;
use std::str::FromStr;

use super::{Backend, Precision, ane, cpu};
use crate::{Error, Result};

/// Which backend to open (`--backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Ane,
    /// The ANE if a probe kernel compiles, runs and matches the CPU; else the CPU.
    Auto,
}

impl BackendKind {
    /// Every kind, the default first.
    pub const ALL: [BackendKind; 3] = [BackendKind::Cpu, BackendKind::Ane, BackendKind::Auto];

    /// The name `--backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Ane => "ane",
            BackendKind::Auto => "auto",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let names = BackendKind::ALL.map(BackendKind::name);
        BackendKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::unknown_name("backend", s, &names))
    }
}

/// An opened backend, the precision its kernels must use, and why it was picked.
pub struct Opened {
    pub backend: Box<dyn Backend>,
    /// `Fp16` on the ANE whatever was asked (its kernels compute in fp16).
    pub precision: Precision,
    /// One line for the user: which backend, and why.
    pub note: String,
}

/// Open the backend `kind`. `precision` is the CPU backend's; the ANE always
/// runs fp16 kernels. `Ane` fails where there is no ANE, naming why.
pub fn open(kind: BackendKind, precision: Precision) -> Result<Opened> {
    let cpu = |note: String| Opened {
        backend: Box::new(cpu::CpuBackend::new(precision)),
        precision,
        note,
    };
    match kind {
        BackendKind::Cpu => Ok(cpu("backend: cpu".into())),
        BackendKind::Ane => {
            let (backend, family) = ane::open()?;
            Ok(Opened {
                backend: Box::new(backend),
                precision: Precision::Fp16,
                note: format!("backend: ane ({family}), fp16 kernels"),
            })
        }
        BackendKind::Auto => match ane::open_probed() {
            Ok((backend, family)) => Ok(Opened {
                backend: Box::new(backend),
                precision: Precision::Fp16,
                note: format!(
                    "backend: ane ({family}; the probe kernel compiled, ran and matched the CPU), fp16 kernels"
                ),
            }),
            Err(e) => Ok(cpu(format!("backend: cpu ({e})"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_their_names_and_name_the_choices_otherwise() {
        for kind in BackendKind::ALL {
            assert_eq!(kind.to_string().parse::<BackendKind>().unwrap(), kind);
        }
        let e = "gpu".parse::<BackendKind>().unwrap_err().to_string();
        assert_eq!(e, "unknown backend `gpu` (expected one of cpu, ane, auto)");
    }

    #[test]
    fn open_names_why_the_ane_is_unavailable_and_auto_falls_back_to_the_cpu() {
        let cpu = open(BackendKind::Cpu, Precision::Fp32).unwrap();
        assert_eq!(
            (cpu.backend.name(), cpu.precision),
            ("cpu", Precision::Fp32)
        );
        let Some(reason) = ane::platform_unavailable_reason() else {
            // Apple silicon: auto runs the ANE where the probe passes, else
            // the CPU; either way with fp16 kernels and a note naming it.
            let auto = open(BackendKind::Auto, Precision::Fp16).unwrap();
            assert_eq!(auto.precision, Precision::Fp16);
            let named = format!("backend: {}", auto.backend.name());
            assert!(auto.note.starts_with(&named), "{}", auto.note);
            return;
        };
        let err = open(BackendKind::Ane, Precision::Fp32).err().unwrap();
        assert_eq!(err.to_string(), format!("ane backend: dlopen: {reason}"));
        let auto = open(BackendKind::Auto, Precision::Fp16).unwrap();
        assert_eq!(auto.backend.name(), "cpu");
        assert_eq!(auto.precision, Precision::Fp16);
        assert!(
            auto.note
                .starts_with("backend: cpu (ane backend: dlopen: ANE unavailable")
        );
    }
}
