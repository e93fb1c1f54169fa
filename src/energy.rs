//! Energy over a span of work: joules drawn by the CPU, GPU and ANE, read
//! without root from IOReport's "Energy Model" counters on macOS (the OS
//! calls live in `backend::ane::ffi`), and the two figures reports print,
//! joules per step and tokens per joule.
//!
//! Where a rail's channels are missing (Linux, Intel Macs, chips or macOS
//! versions without them) its value is [`Joules::Unavailable`], written as
//! `"unavailable"` in JSON, never 0. Which channel feeds which rail follows
//! the names other readers match (`... CPU Energy`, `GPU Energy`, `ANE...`);
//! unverified by us on hardware (`docs/ane-notes.md`). This module does not
//! print, and it does not decide what a step is: callers say how many steps
//! and tokens a span covered.

use std::fmt;
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::backend::ane::{ChannelValue, IoReport, IoSample};

/// A measured quantity, or why there is none.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Joules {
    Measured(f64),
    /// No counter for it here.
    #[default]
    Unavailable,
}

impl Joules {
    pub fn value(self) -> Option<f64> {
        match self {
            Joules::Measured(v) => Some(v),
            Joules::Unavailable => None,
        }
    }

    fn from_option(v: Option<f64>) -> Joules {
        v.filter(|v| v.is_finite())
            .map_or(Joules::Unavailable, Joules::Measured)
    }
}

impl fmt::Display for Joules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Joules::Measured(v) => write!(f, "{v:.4}"),
            Joules::Unavailable => f.write_str("unavailable"),
        }
    }
}

/// The word written where there is no measurement.
pub const UNAVAILABLE: &str = "unavailable";

impl Serialize for Joules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Joules::Measured(v) => s.serialize_f64(*v),
            Joules::Unavailable => s.serialize_str(UNAVAILABLE),
        }
    }
}

impl<'de> Deserialize<'de> for Joules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Joules, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Number(f64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Number(v) => Ok(Joules::Measured(v)),
            Either::Text(t) if t == UNAVAILABLE => Ok(Joules::Unavailable),
            Either::Text(t) => Err(serde::de::Error::custom(format!(
                "expected joules or \"{UNAVAILABLE}\", got \"{t}\""
            ))),
        }
    }
}

/// The energy of one span: joules per rail, and per step and per token over
/// the rails measured (their sum; unavailable when none is).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Energy {
    pub cpu_j: Joules,
    pub gpu_j: Joules,
    pub ane_j: Joules,
    pub joules_per_step: Joules,
    pub tokens_per_joule: Joules,
}

impl Energy {
    /// The rails' joules over `steps` steps that processed `tokens` tokens.
    pub fn of(rails: Rails, steps: u64, tokens: u64) -> Energy {
        let measured = [rails.cpu, rails.gpu, rails.ane];
        let total = measured.iter().flatten().copied().reduce(|a, b| a + b);
        let per_step = total.filter(|_| steps > 0).map(|j| j / steps as f64);
        let per_joule = total.filter(|j| *j > 0.0).map(|j| tokens as f64 / j);
        Energy {
            cpu_j: Joules::from_option(rails.cpu),
            gpu_j: Joules::from_option(rails.gpu),
            ane_j: Joules::from_option(rails.ane),
            joules_per_step: Joules::from_option(per_step),
            tokens_per_joule: Joules::from_option(per_joule),
        }
    }

    /// One line for reports: "0.52 J/step, 1200 tokens/J (cpu 0.40 J, gpu 0.02 J, ane 0.10 J)"
    /// or "unavailable".
    pub fn summary(&self) -> String {
        let Joules::Measured(per_step) = self.joules_per_step else {
            return UNAVAILABLE.into();
        };
        let rails = [
            ("cpu", self.cpu_j),
            ("gpu", self.gpu_j),
            ("ane", self.ane_j),
        ]
        .map(|(name, j)| match j {
            Joules::Measured(v) => format!("{name} {v:.3} J"),
            Joules::Unavailable => format!("{name} {UNAVAILABLE}"),
        })
        .join(", ");
        format!(
            "{per_step:.4} J/step, {} tokens/J ({rails})",
            self.tokens_per_joule
                .value()
                .map_or(UNAVAILABLE.to_string(), |t| format!("{t:.0}"))
        )
    }
}

/// Joules per rail over a span; `None` where the rail has no channel.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rails {
    pub cpu: Option<f64>,
    pub gpu: Option<f64>,
    pub ane: Option<f64>,
}

/// The rail an "Energy Model" channel feeds, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rail {
    Cpu,
    Gpu,
    Ane,
}

/// Which rail the channel `name` of the "Energy Model" group counts (the
/// names `macmon`/`powermetrics` readers match): `<cluster> CPU Energy` or
/// `CPU Energy`, `GPU Energy`, `ANE...`. Other channels (DRAM, per-core
/// breakdowns) belong to none.
pub fn rail(name: &str) -> Option<Rail> {
    if name.ends_with("CPU Energy") {
        Some(Rail::Cpu)
    } else if name == "GPU Energy" {
        Some(Rail::Gpu)
    } else if name.starts_with("ANE") {
        Some(Rail::Ane)
    } else {
        None
    }
}

/// `value` in the unit `unit` (`mJ`, `uJ`/`µJ`, `nJ`, `J`) as joules.
pub fn joules(value: i64, unit: &str) -> Option<f64> {
    let scale = match unit.trim() {
        "J" => 1.0,
        "mJ" => 1e-3,
        "uJ" | "µJ" => 1e-6,
        "nJ" => 1e-9,
        _ => return None,
    };
    Some(value as f64 * scale)
}

/// Sum the "Energy Model" channels of a delta into rails.
pub fn rails(channels: &[ChannelValue]) -> Rails {
    let mut out = Rails::default();
    for c in channels.iter().filter(|c| c.group == "Energy Model") {
        let (Some(rail), Some(j)) = (rail(&c.channel), joules(c.value, &c.unit)) else {
            continue;
        };
        let slot = match rail {
            Rail::Cpu => &mut out.cpu,
            Rail::Gpu => &mut out.gpu,
            Rail::Ane => &mut out.ane,
        };
        *slot = Some(slot.unwrap_or(0.0) + j);
    }
    out
}

/// The process's subscription, opened on first use (`Err`: why there is none).
fn meter() -> &'static Mutex<std::result::Result<IoReport, String>> {
    static METER: OnceLock<Mutex<std::result::Result<IoReport, String>>> = OnceLock::new();
    METER.get_or_init(|| Mutex::new(IoReport::open().map_err(|e| e.to_string())))
}

/// Why energy cannot be measured here, or `None` when the counters open.
pub fn unavailable_reason() -> Option<String> {
    let guard = meter().lock().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().err().cloned()
}

/// The start of a span of work whose energy [`Span::finish`] reports.
pub struct Span {
    sample: Option<IoSample>,
}

/// Start measuring (a no-op where there are no counters).
pub fn start() -> Span {
    let guard = meter().lock().unwrap_or_else(|e| e.into_inner());
    Span {
        sample: guard.as_ref().ok().and_then(|r| r.sample().ok()),
    }
}

impl Span {
    /// The energy since [`start`], over `steps` steps of `tokens` tokens in all.
    pub fn finish(self, steps: u64, tokens: u64) -> Energy {
        let Some(earlier) = self.sample else {
            return Energy::default();
        };
        let guard = meter().lock().unwrap_or_else(|e| e.into_inner());
        let Ok(report) = guard.as_ref() else {
            return Energy::default();
        };
        let delta = report
            .sample()
            .and_then(|later| report.delta(&earlier, &later));
        match delta {
            Ok(channels) => Energy::of(rails(&channels), steps, tokens),
            Err(_) => Energy::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(group: &str, name: &str, unit: &str, value: i64) -> ChannelValue {
        ChannelValue {
            group: group.into(),
            channel: name.into(),
            unit: unit.into(),
            value,
        }
    }

    #[test]
    fn channels_sum_into_rails_by_name_and_unit() {
        let delta = [
            channel("Energy Model", "ECPU Energy", "mJ", 100),
            channel("Energy Model", "PCPU Energy", "mJ", 300),
            channel("Energy Model", "GPU Energy", "nJ", 5_000_000),
            channel("Energy Model", "ANE0", "uJ", 250_000),
            channel("Energy Model", "DRAM0", "mJ", 70),
            channel("CPU Stats", "CPU Energy", "mJ", 999),
            channel("Energy Model", "ANE1", "furlongs", 1),
        ];
        let r = rails(&delta);
        assert_eq!(r.cpu, Some(0.4));
        assert_eq!(r.gpu, Some(0.005));
        assert_eq!(r.ane, Some(0.25));
        let e = Energy::of(r, 2, 1310);
        assert_eq!(e.joules_per_step, Joules::Measured(0.655 / 2.0));
        assert!((e.tokens_per_joule.value().unwrap() - 2000.0).abs() < 1e-9);
        assert!(e.summary().contains("J/step"), "{}", e.summary());
    }

    #[test]
    fn missing_rails_are_unavailable_never_zero() {
        // An M2 Pro-like delta without ANE channels.
        let r = rails(&[channel("Energy Model", "CPU Energy", "mJ", 500)]);
        let e = Energy::of(r, 1, 100);
        assert_eq!(e.ane_j, Joules::Unavailable);
        assert_eq!(e.cpu_j, Joules::Measured(0.5));
        let json = serde_json::to_value(e).unwrap();
        assert_eq!(json["ane_j"], "unavailable");
        assert_eq!(json["gpu_j"], "unavailable");
        assert_eq!(json["cpu_j"], 0.5);
        assert_eq!(serde_json::from_value::<Energy>(json).unwrap(), e);
        // Nothing measured at all: every field unavailable.
        let none = Energy::of(Rails::default(), 3, 10);
        assert_eq!(none, Energy::default());
        assert_eq!(none.summary(), "unavailable");
        let json = serde_json::to_value(none).unwrap();
        let fields = json.as_object().unwrap();
        assert!(fields.values().all(|v| v == UNAVAILABLE), "{json}");
        assert!(serde_json::from_str::<Joules>("\"zero\"").is_err());
    }

    #[test]
    fn off_macos_every_span_is_unavailable() {
        if std::env::consts::OS == "macos" {
            return;
        }
        assert!(unavailable_reason().unwrap().contains("need macOS"));
        let span = start();
        assert_eq!(span.finish(1, 64), Energy::default());
    }
}
