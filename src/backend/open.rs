//! Which backend to open ([`BackendKind`], the `--backend` names) and
//! [`open`], which opens it: the CPU interpreter, the ANE, or `auto`, the ANE
//! where the probe kernels (conv, width-axis moves, runtime matmul) compile,
//! run and match the CPU, else the CPU with the reason.

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
    open_with(kind, precision, ane::open)
}

/// [`open`] over the ANE runtime `open_ane` opens (the private framework, or
/// a stand-in in tests). `auto` probes the chip ([`ane::probe::examine`]) and
/// takes the CPU, saying why, when the training kernels cannot run there.
pub fn open_with<R: ane::Runtime + 'static>(
    kind: BackendKind,
    precision: Precision,
    open_ane: impl FnOnce() -> Result<(ane::AneBackend<R>, String)>,
) -> Result<Opened> {
    let cpu = |note: String| Opened {
        backend: Box::new(cpu::CpuBackend::new(precision)),
        precision,
        note,
    };
    match kind {
        BackendKind::Cpu => Ok(cpu("backend: cpu".into())),
        BackendKind::Ane => {
            let (backend, family) = open_ane()?;
            Ok(Opened {
                backend: Box::new(backend),
                precision: Precision::Fp16,
                note: format!("backend: ane ({family}), fp16 kernels"),
            })
        }
        BackendKind::Auto => match open_ane() {
            Ok((mut backend, family)) => {
                let chip = ane::probe::examine(&mut backend);
                if let Some(reason) = chip.training_refusal() {
                    // Dropping the ANE backend unloads what the probes left.
                    return Ok(cpu(format!(
                        "backend: cpu (the ANE ({family}) cannot run the training kernels: {reason})"
                    )));
                }
                Ok(Opened {
                    backend: Box::new(backend),
                    precision: Precision::Fp16,
                    note: format!(
                        "backend: ane ({family}; the probe kernels compiled, ran and matched the CPU: {}), fp16 kernels",
                        chip.summary()
                    ),
                })
            }
            Err(e) => Ok(cpu(format!("backend: cpu ({e})"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mil::Dialect;

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

    fn fake(
        runtime: ane::fake::FakeRuntime,
    ) -> Result<(ane::AneBackend<ane::fake::FakeRuntime>, String)> {
        let budget = ane::budget::CompileBudget::default();
        Ok((ane::AneBackend::new(runtime, budget), "fake".into()))
    }

    fn in_temp(name: &str) -> ane::fake::FakeRuntime {
        let root = std::env::temp_dir().join(format!("anemone-open-{name}-{}", std::process::id()));
        ane::fake::FakeRuntime::new(root)
    }

    /// `auto` on chips that refuse what the packed training kernels need
    /// takes the CPU and says which probe failed and what needs it.
    #[test]
    fn auto_takes_the_cpu_on_a_chip_that_refuses_matmul_or_width_moves() {
        let refusing_matmul = in_temp("matmul").refusing_op(crate::mil::Op::Matmul);
        let auto = open_with(BackendKind::Auto, Precision::Fp32, || fake(refusing_matmul)).unwrap();
        assert_eq!(auto.backend.name(), "cpu");
        assert_eq!(auto.precision, Precision::Fp32);
        for needle in [
            "backend: cpu (the ANE (fake) cannot run the training kernels",
            "runtime matmul probe failed",
            "`matmul` is not supported",
            "M1/M2",
        ] {
            assert!(auto.note.contains(needle), "{needle}: {}", auto.note);
        }
        let refusing_concat = in_temp("concat").refusing_op(crate::mil::Op::Concat);
        let auto = open_with(BackendKind::Auto, Precision::Fp16, || fake(refusing_concat)).unwrap();
        assert_eq!(auto.backend.name(), "cpu");
        assert!(
            auto.note
                .contains("width-axis slice/concat/reshape probe failed")
                && auto.note.contains("M3 Ultra")
                && auto.note.contains("baked weights"),
            "{}",
            auto.note
        );
        // The conv refused in both dialects: the probe's errors, per dialect.
        let refusing_conv = in_temp("conv").refusing_op(crate::mil::Op::Conv);
        let auto = open_with(BackendKind::Auto, Precision::Fp16, || fake(refusing_conv)).unwrap();
        assert!(
            auto.note.contains("failed in both dialects (ios18: "),
            "{}",
            auto.note
        );
        // `--backend ane` is not probed: the user asked for it.
        let refusing = in_temp("ane").refusing_op(crate::mil::Op::Matmul);
        let ane = open_with(BackendKind::Ane, Precision::Fp32, || fake(refusing)).unwrap();
        assert_eq!(
            (ane.backend.name(), ane.precision),
            ("ane", Precision::Fp16)
        );
    }

    /// A chip that refuses ios18 but takes `program(1.0)`/ios16: the ANE, in ios16.
    #[test]
    fn auto_falls_back_to_the_ios16_dialect_where_ios18_is_refused() {
        let runtime = in_temp("ios16").refusing_dialect(Dialect::Ios18);
        let auto = open_with(BackendKind::Auto, Precision::Fp32, || fake(runtime)).unwrap();
        assert_eq!(auto.backend.name(), "ane", "{}", auto.note);
        assert_eq!(auto.backend.dialect(), Dialect::Ios16);
        assert!(auto.note.contains("dialect ios16"), "{}", auto.note);
        let plain = open_with(BackendKind::Auto, Precision::Fp32, || {
            fake(in_temp("plain"))
        })
        .unwrap();
        assert_eq!(
            (plain.backend.name(), plain.backend.dialect()),
            ("ane", Dialect::Ios18)
        );
        assert!(
            plain
                .note
                .contains("probes passed: conv, width-axis slice/concat/reshape, runtime matmul"),
            "{}",
            plain.note
        );
    }
}
