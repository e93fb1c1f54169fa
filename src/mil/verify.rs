//! The verifier: structural checks that hold for every backend, plus the
//! catalogue of ANE rules ([`RULES`]) learned from the maderix/ANE reference.
//!
//! [`verify`] never fails; it returns a [`VerifyReport`] of [`Diagnostic`]s, each
//! tagged with the id of the rule that fired. Rules with ids `MIL…` apply to
//! every target; rules with ids `ANE…` only to [`Target::Ane`]. Whatever the
//! reference leaves uncertain is a warning, never an error.
//!
//! This module does not run anything and does not decide which chip it is on;
//! the catalogue is also rendered as the table in `docs/ane-notes.md`
//! (a unit test keeps the two identical).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use super::infer::{infer_outputs, result_mismatches};
use super::ir::{Arg, DType, Dialect, Literal, Operation, Program, TensorType};
use super::layout;
use super::op::{Category, Op, Opset};
use crate::Result;

/// Where a program is meant to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The portable CPU interpreter: structural rules only.
    Cpu,
    /// The Apple Neural Engine: structural rules plus the `ANE…` catalogue.
    Ane,
}

impl Target {
    /// Every target, the default first.
    pub const ALL: [Target; 2] = [Target::Ane, Target::Cpu];

    /// The name `mil check --target` takes.
    pub fn name(self) -> &'static str {
        match self {
            Target::Cpu => "cpu",
            Target::Ane => "ane",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Target {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        let names = Target::ALL.map(Target::name);
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| crate::Error::unknown_name("target", s, &names))
    }
}

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Known to fail (or to be malformed MIL): the program must not be compiled.
    Error,
    /// Observed to fail somewhere, or not verified: compile at your own risk.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One entry of the rule catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `MIL001`… (every target) or `ANE001`… (ANE only).
    pub id: &'static str,
    pub severity: Severity,
    /// What the rule checks, one line.
    pub rule: &'static str,
    /// Why, one line.
    pub reason: &'static str,
    /// Where the fact comes from.
    pub source: &'static str,
}

impl Rule {
    /// Whether the rule is checked for `target`.
    pub fn applies_to(&self, target: Target) -> bool {
        !self.id.starts_with("ANE") || target == Target::Ane
    }
}

const fn rule(
    id: &'static str,
    severity: Severity,
    rule: &'static str,
    reason: &'static str,
    source: &'static str,
) -> Rule {
    Rule {
        id,
        severity,
        rule,
        reason,
        source,
    }
}

use Severity::{Error as E, Warning as W};

/// Every rule the verifier checks, in id order.
pub static RULES: &[Rule] = &[
    rule(
        "MIL001",
        E,
        "every op's operands fit the op (shape, dtype, constant parameters)",
        "shape/dtype inference must succeed for the compiler to accept the op",
        "coremltools MIL op definitions",
    ),
    rule(
        "MIL002",
        E,
        "every op's declared result types equal the inferred ones",
        "the CPU backend and the ANE compiler trust the declared types",
        "coremltools MIL op definitions",
    ),
    rule(
        "MIL003",
        E,
        "value names and op `name` attributes are unique",
        "MIL is SSA and every statement needs a unique name",
        "ane-reference §4.2",
    ),
    rule(
        "MIL004",
        E,
        "every variable an op uses is defined by an earlier statement or an input",
        "MIL is SSA in statement order",
        "ane-reference §4.2",
    ),
    rule(
        "MIL005",
        E,
        "the function has at least one output and every output is defined",
        "outputs are referenced by variable name",
        "ane-reference §4.1",
    ),
    rule(
        "MIL006",
        E,
        "BLOBFILE paths start with `@model_path/weights/`, offsets are >= 64 and 64-aligned",
        "the offset names a 64-byte record after the 64-byte file header",
        "ane-reference §3.1, §3.3, §10.3",
    ),
    rule(
        "MIL007",
        E,
        "each BLOBFILE names a package file whose record at the offset matches the declared type",
        "sentinel 0xDEADBEEF, dtype code and payload size must describe the constant",
        "ane-reference §3.1, §3.3",
    ),
    rule(
        "MIL008",
        W,
        "ops and forms exist in the program's dialect",
        "quantize/dequantize are iOS17 ops, scaled_dot_product_attention iOS18, `reshape` 0 is right-aligned only from iOS17",
        "coremltools MIL op definitions",
    ),
    rule(
        "ANE001",
        E,
        "function inputs and outputs are rank-4 fp16 or fp32 tensors",
        "they are bound to IOSurfaces holding a 4-D fp16/fp32 tensor",
        "ane-reference §2.1, §2.4",
    ),
    rule(
        "ANE002",
        W,
        "function inputs and outputs have shape [1, C, 1, S]",
        "anemone's surfaces use the channel-major [1, C, 1, S] layout; other layouts ran only in a benchmark",
        "ane-reference §2.3, §2.4",
    ),
    rule(
        "ANE003",
        W,
        "a kernel has a single input and a single output",
        "multi-input requests were reported to fail with 0x1d; every production kernel packs I/O",
        "ane-reference §2.6, §8.1",
    ),
    rule(
        "ANE004",
        E,
        "conv weights are compile-time constants",
        "the ANE bakes conv weights at compile time; runtime weights need matmul",
        "ane-reference §1.10, §8.1",
    ),
    rule(
        "ANE005",
        E,
        "scaled_dot_product_attention has no attn_mask",
        "the hardware ignores the mask; use matmul/add(mask)/softmax/matmul",
        "ane-reference §5.2, §10.11",
    ),
    rule(
        "ANE006",
        W,
        "no matmul or scaled_dot_product_attention in the ios16 dialect",
        "reported to fail on M1/M2, the chips that need ios16",
        "ane-reference §3.2 (unmerged PR #6)",
    ),
    rule(
        "ANE007",
        W,
        "no cast in the ios16 dialect",
        "reported unsupported on M1/M2; use fp16 I/O there",
        "ane-reference §2.4, §3.2 (unmerged PR #6)",
    ),
    rule(
        "ANE008",
        W,
        "fp32 inputs feed only `cast` ops and fp32 outputs come from `cast`",
        "fp32 I/O was only used with an in-graph cast to and from fp16",
        "ane-reference §2.4",
    ),
    rule(
        "ANE009",
        E,
        "inputs and outputs have at least 64 channels",
        "probes with fewer channels failed (\"ANE minimum size requirement\"); pad the channels",
        "ane-reference §2.5 (commit 184b182)",
    ),
    rule(
        "ANE010",
        E,
        "input and output tensors hold at least 49,152 bytes",
        "evaluate failed with 0x1d on smaller surfaces; pad the tensor",
        "ane-reference §2.5 (unmerged PR #16)",
    ),
    rule(
        "ANE011",
        W,
        "conv input channels stay below 32,000",
        "the compiler rejected a conv with 32,000 input channels (classifier backward)",
        "ane-reference §5.4",
    ),
    rule(
        "ANE012",
        W,
        "only ops the reference ran on the ANE",
        "the op is not used by the reference; unverified",
        "ane-reference §4.3",
    ),
    rule(
        "ANE013",
        W,
        "one blob record per weight file (BLOBFILE offset 64)",
        "multi-record weight files failed on M1; one file per tensor works everywhere",
        "ane-reference §3.2, §10.3",
    ),
    rule(
        "ANE014",
        W,
        "optional parameters spelled out: conv's five hyper-parameters, matmul's transposes, concat's interleave",
        "the form every reference kernel uses; defaults were never tested",
        "ane-reference §4.3, §10.4",
    ),
    rule(
        "ANE015",
        E,
        "input and output widths (last axis) are at least 16 and a multiple of 16",
        "other widths silently corrupt the data; pad the width",
        "field report: rustane README, jmanhype/ane-lora-training README",
    ),
    rule(
        "ANE016",
        E,
        "input and output rows (width x element size) are a multiple of 64 bytes",
        "surface rows are strided to 64 bytes (PR #16 pads the stride); other rows are misread; pad the width",
        "field report: issue 22; ane-reference §2.5 (unmerged PR #16)",
    ),
    rule(
        "ANE017",
        E,
        "several inputs all hold the same number of bytes",
        "input surfaces of different allocation sizes were reported to fail; pad the smaller inputs",
        "field report: Orion core/lora_adapter.h",
    ),
    rule(
        "ANE018",
        E,
        "several inputs are declared in alphabetical order of their names",
        "surfaces are bound to inputs in name order; another declaration order swaps them",
        "field report: Orion core/lora_adapter.h",
    ),
    rule(
        "ANE019",
        E,
        "no tensor dimension exceeds 65,536",
        "larger dimensions fail to compile; chunk the tensor (e.g. a classifier over a large vocabulary)",
        "field report: maderix/ANE#26, ANEForge#227",
    ),
    rule(
        "ANE020",
        E,
        "baked weights of a program total at most 2 GiB",
        "the compiler refuses more than 2,147,483,648 bytes of weights; split the program into chunks",
        "field report: coremltools#2593, ANEForge#45, ANEForge#254",
    ),
    rule(
        "ANE021",
        E,
        "a program names at most 16 weight files",
        "programs with more BLOBFILE files were reported to fail; keep the weights in one weight.bin",
        "field report: issue 22",
    ),
    rule(
        "ANE022",
        W,
        "no rsqrt or sqrt of a reduction",
        "the compiler failed on rsqrt/sqrt after a reduce op; use pow(x, -0.5) or pow(x, 0.5)",
        "field report: rustane README",
    ),
    rule(
        "ANE023",
        W,
        "no reduce_mean",
        "reduce_mean was reported missing from the MIL text the compiler takes; use reduce_sum times 1/N",
        "field report: hollance/neural-engine#44",
    ),
    rule(
        "ANE024",
        W,
        "softmax runs over an axis whose size is a power of two",
        "softmax over other sizes failed with InvalidMILProgram; pad the axis to a power of two and mask it",
        "field report: hollance/neural-engine#44",
    ),
];

/// The catalogue entry with id `id`.
pub fn rule_by_id(id: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.id == id)
}

/// The catalogue as a Markdown table (id, severity, rule, reason, source), as in `docs/ane-notes.md`.
pub fn rules_markdown_table() -> String {
    let mut s = String::from("| id | severity | rule | reason | source |\n|---|---|---|---|---|\n");
    for r in RULES {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.id, r.severity, r.rule, r.reason, r.source
        ));
    }
    s
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Id of the rule in [`RULES`].
    pub rule: &'static str,
    pub severity: Severity,
    /// The op kind at fault, if the finding is about an operation.
    pub op: Option<Op>,
    /// The op's `name` attribute, or the input/output variable at fault.
    pub name: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.severity, self.rule)?;
        match (&self.op, &self.name) {
            (Some(op), Some(name)) => write!(f, " op `{op}` (name \"{name}\")")?,
            (None, Some(name)) => write!(f, " `{name}`")?,
            _ => {}
        }
        write!(f, ": {}", self.message)
    }
}

/// Every finding of one verification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub diagnostics: Vec<Diagnostic>,
}

impl VerifyReport {
    /// No errors (warnings allowed).
    pub fn is_ok(&self) -> bool {
        self.errors().next().is_none()
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
    }

    /// Whether rule `id` fired.
    pub fn fired(&self, id: &str) -> bool {
        self.diagnostics.iter().any(|d| d.rule == id)
    }

    /// The ids of the rules that fired, sorted and deduplicated.
    pub fn rule_ids(&self) -> Vec<&'static str> {
        let mut ids: Vec<_> = self.diagnostics.iter().map(|d| d.rule).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// `Ok(self)` without errors, else [`crate::Error::Verify`] listing every error.
    pub fn into_result(self) -> Result<VerifyReport> {
        if self.is_ok() {
            return Ok(self);
        }
        let lines: Vec<String> = self.errors().map(|d| d.to_string()).collect();
        Err(crate::Error::Verify(lines.join("\n")))
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.diagnostics {
            writeln!(f, "{d}")?;
        }
        write!(
            f,
            "{} error(s), {} warning(s)",
            self.errors().count(),
            self.warnings().count()
        )
    }
}

/// Check `program` for `target`. Structural rules always, `ANE…` rules for [`Target::Ane`].
pub fn verify(program: &Program, target: Target) -> VerifyReport {
    let mut checker = Checker::new(program, target);
    checker.structural();
    if target == Target::Ane {
        checker.ane();
    }
    checker.finish()
}

/// [`verify`] plus the weight-file checks (MIL007) against `weights`
/// (`@model_path/weights/<file>` -> file bytes, as a program package holds them).
pub fn verify_with_weights(
    program: &Program,
    weights: &BTreeMap<String, Vec<u8>>,
    target: Target,
) -> VerifyReport {
    let mut checker = Checker::new(program, target);
    checker.structural();
    checker.weights(weights);
    if target == Target::Ane {
        checker.ane();
    }
    checker.finish()
}

/// Prefix every BLOBFILE path must have.
pub const WEIGHTS_PREFIX: &str = "@model_path/weights/";

/// Blob dtype codes of the MILBlob format (ane-reference §3.3).
fn blob_dtype_code(dtype: DType) -> Option<u32> {
    match dtype {
        DType::Fp16 => Some(1),
        DType::Fp32 => Some(2),
        DType::Uint8 => Some(3),
        DType::Int8 => Some(4),
        DType::Int32 => Some(14),
        DType::Uint64 | DType::Bool | DType::String => None,
    }
}

/// Every variable an argument names (tuple elements included).
fn arg_vars(arg: &Arg) -> Vec<&str> {
    match arg {
        Arg::Var(name) => vec![name.as_str()],
        Arg::Lit(_) => Vec::new(),
        Arg::Tuple(items) => items.iter().flat_map(arg_vars).collect(),
    }
}

/// Every literal of an op: attributes and inline arguments.
fn op_literals(op: &Operation) -> Vec<&Literal> {
    fn from_arg<'a>(arg: &'a Arg, out: &mut Vec<&'a Literal>) {
        match arg {
            Arg::Lit(lit) => out.push(lit),
            Arg::Tuple(items) => items.iter().for_each(|a| from_arg(a, out)),
            Arg::Var(_) => {}
        }
    }
    let mut out: Vec<&Literal> = op.attrs.iter().map(|(_, l)| l).collect();
    for (_, arg) in &op.args {
        from_arg(arg, &mut out);
    }
    out
}

struct Checker<'a> {
    program: &'a Program,
    target: Target,
    diagnostics: Vec<Diagnostic>,
    /// Value name -> index of the defining op (`None` for function inputs).
    defined_by: HashMap<&'a str, Option<usize>>,
}

impl<'a> Checker<'a> {
    fn new(program: &'a Program, target: Target) -> Self {
        Checker {
            program,
            target,
            diagnostics: Vec::new(),
            defined_by: HashMap::new(),
        }
    }

    fn finish(self) -> VerifyReport {
        VerifyReport {
            diagnostics: self.diagnostics,
        }
    }

    fn report(
        &mut self,
        id: &'static str,
        op: Option<&Operation>,
        name: Option<&str>,
        message: String,
    ) {
        let rule = rule_by_id(id).unwrap_or_else(|| panic!("rule {id} is not in the catalogue"));
        debug_assert!(rule.applies_to(self.target));
        self.diagnostics.push(Diagnostic {
            rule: id,
            severity: rule.severity,
            op: op.map(|o| o.op),
            name: name.or(op.map(|o| o.name.as_str())).map(str::to_string),
            message,
        });
    }

    fn on_op(&mut self, id: &'static str, op: &Operation, message: String) {
        self.report(id, Some(op), None, message);
    }

    fn on_var(&mut self, id: &'static str, var: &str, message: String) {
        self.report(id, None, Some(var), message);
    }

    // ---- structural -------------------------------------------------------

    fn structural(&mut self) {
        let func = &self.program.main;
        let mut op_names = HashSet::new();
        for input in &func.inputs {
            if self.defined_by.insert(&input.name, None).is_some() {
                self.on_var(
                    "MIL003",
                    &input.name,
                    format!("input `{}` is declared twice", input.name),
                );
            }
        }
        // Declared names, to tell "defined later" from "never defined".
        let mut later: HashMap<&str, &str> = HashMap::new();
        for op in &func.ops {
            for out in &op.outputs {
                later.entry(out.name.as_str()).or_insert(op.name.as_str());
            }
        }
        for (idx, op) in func.ops.iter().enumerate() {
            if !op_names.insert(op.name.as_str()) {
                self.on_op(
                    "MIL003",
                    op,
                    format!("op name \"{}\" is used twice", op.name),
                );
            }
            let mut operands_ok = true;
            for (param, arg) in &op.args {
                for var in arg_vars(arg) {
                    if self.defined_by.contains_key(var) {
                        continue;
                    }
                    operands_ok = false;
                    let msg = match later.get(var) {
                        Some(by) => format!(
                            "operand `{param}` uses `{var}`, which op \"{by}\" defines only later"
                        ),
                        None => format!("operand `{param}` uses `{var}`, which is never defined"),
                    };
                    self.on_op("MIL004", op, msg);
                }
            }
            if operands_ok {
                self.check_types(op);
            }
            for out in &op.outputs {
                if self.defined_by.insert(&out.name, Some(idx)).is_some() {
                    self.on_op(
                        "MIL003",
                        op,
                        format!("value `{}` is defined twice", out.name),
                    );
                }
            }
            self.check_blob_refs(op);
            self.check_dialect(op);
        }
        if func.outputs.is_empty() {
            self.report(
                "MIL005",
                None,
                None,
                "the function declares no outputs".into(),
            );
        }
        for out in &func.outputs {
            if !self.defined_by.contains_key(out.as_str()) {
                self.on_var("MIL005", out, format!("output `{out}` is never defined"));
            }
        }
    }

    fn check_types(&mut self, op: &Operation) {
        match infer_outputs(&self.program.main, op) {
            Err(crate::Error::Op { msg, .. }) => self.on_op("MIL001", op, msg),
            Err(other) => self.on_op("MIL001", op, other.to_string()),
            Ok(types) => {
                for msg in result_mismatches(op, &types) {
                    self.on_op("MIL002", op, msg);
                }
            }
        }
    }

    fn check_blob_refs(&mut self, op: &Operation) {
        for lit in op_literals(op) {
            let Some(blob) = lit.as_blob() else { continue };
            if !blob.path.starts_with(WEIGHTS_PREFIX) || blob.path.len() == WEIGHTS_PREFIX.len() {
                self.on_op(
                    "MIL006",
                    op,
                    format!(
                        "BLOBFILE path \"{}\" must start with `{WEIGHTS_PREFIX}` and name a file",
                        blob.path
                    ),
                );
            }
            if blob.offset < 64 || blob.offset % 64 != 0 {
                self.on_op(
                    "MIL006",
                    op,
                    format!(
                        "BLOBFILE offset {} must be >= 64 and a multiple of 64 (it points at a 64-byte record after the file header)",
                        blob.offset
                    ),
                );
            }
        }
    }

    fn check_dialect(&mut self, op: &Operation) {
        if self.program.dialect != Dialect::Ios16 {
            return;
        }
        let since = op.op.since();
        if since > Opset::Ios16 {
            self.on_op(
                "MIL008",
                op,
                format!(
                    "`{}` is an {since} op but the program is in the ios16 dialect",
                    op.op
                ),
            );
        }
        if op.op == Op::Reshape {
            let spec = match op.arg("shape") {
                Some(Arg::Lit(l)) => Some(l),
                Some(Arg::Var(v)) => self.program.main.const_value(v),
                _ => None,
            };
            let rank = match op.arg("x") {
                Some(Arg::Var(v)) => self.program.main.var_type(v).map(TensorType::rank),
                Some(Arg::Lit(l)) => Some(l.ty.rank()),
                _ => None,
            };
            if let (Some(ints), Some(rank)) = (spec.and_then(Literal::as_ints), rank)
                && ints.contains(&0)
                && ints.len() != rank
            {
                self.on_op(
                    "MIL008",
                    op,
                    format!(
                        "`shape` {ints:?} uses 0 with a length other than the rank {rank} of `x`; before iOS17 that is an error"
                    ),
                );
            }
        }
    }

    // ---- weights ------------------------------------------------------------

    fn weights(&mut self, weights: &BTreeMap<String, Vec<u8>>) {
        for (op, lit) in self.program.blob_refs() {
            let blob = lit.as_blob().expect("blob_refs yields blobs");
            let Some(bytes) = weights.get(&blob.path) else {
                self.on_op(
                    "MIL007",
                    op,
                    format!("weight file \"{}\" is not in the package", blob.path),
                );
                continue;
            };
            if let Err(msg) = check_blob_record(bytes, blob.offset, &lit.ty) {
                self.on_op(
                    "MIL007",
                    op,
                    format!(
                        "weight file \"{}\", record at offset {}: {msg}",
                        blob.path, blob.offset
                    ),
                );
            }
        }
    }

    // ---- ANE rules -------------------------------------------------------------

    fn ane(&mut self) {
        let program = self.program;
        let func = &program.main;
        self.ane_io();

        // Consumers of each value: (op index, parameter).
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (idx, op) in func.ops.iter().enumerate() {
            for (_, arg) in &op.args {
                for var in arg_vars(arg) {
                    consumers.entry(var).or_default().push(idx);
                }
            }
        }
        for input in &func.inputs {
            if input.ty.dtype != DType::Fp32 {
                continue;
            }
            let uses = consumers
                .get(input.name.as_str())
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if let Some(&bad) = uses.iter().find(|&&i| func.ops[i].op != Op::Cast) {
                self.on_var(
                    "ANE008",
                    &input.name,
                    format!(
                        "fp32 input feeds op \"{}\" (`{}`); cast it to fp16 first or declare the input fp16",
                        func.ops[bad].name, func.ops[bad].op
                    ),
                );
            }
        }
        for out in &func.outputs {
            let Some(Some(idx)) = self.defined_by.get(out.as_str()).copied() else {
                continue;
            };
            let producer = &func.ops[idx];
            let is_fp32 = func.var_type(out).is_some_and(|t| t.dtype == DType::Fp32);
            if is_fp32 && producer.op != Op::Cast {
                self.on_var(
                    "ANE008",
                    out,
                    format!(
                        "fp32 output comes from `{}`, not from a cast of an fp16 value; declare the output fp16 or cast",
                        producer.op
                    ),
                );
            }
        }

        self.ane_weights();
        for op in &func.ops {
            self.ane_dims(op);
            match op.op {
                Op::Conv => self.ane_conv(op),
                Op::Rsqrt | Op::Sqrt => self.ane_root_of_reduction(op),
                Op::ReduceMean => self.on_op(
                    "ANE023",
                    op,
                    "`reduce_mean` was reported missing from the compiler's MIL; use reduce_sum and mul by 1/N".into(),
                ),
                Op::Softmax => self.ane_softmax(op),
                Op::ScaledDotProductAttention if op.arg("attn_mask").is_some() => self.on_op(
                    "ANE005",
                    op,
                    "`attn_mask` is ignored by the hardware; build attention from matmul, add(mask), softmax, matmul".into(),
                ),
                _ => {}
            }
            if program.dialect == Dialect::Ios16 {
                if matches!(op.op, Op::Matmul | Op::ScaledDotProductAttention) {
                    self.on_op(
                        "ANE006",
                        op,
                        format!(
                            "`{}` was reported to fail on M1/M2 (the ios16 dialect's chips)",
                            op.op
                        ),
                    );
                }
                if op.op == Op::Cast {
                    self.on_op(
                        "ANE007",
                        op,
                        "`cast` was reported unsupported on M1/M2; use fp16 inputs and outputs"
                            .into(),
                    );
                }
            }
            if !op.op.ran_on_ane() {
                self.on_op(
                    "ANE012",
                    op,
                    format!(
                        "`{}` is not used by the reference; unverified on the ANE",
                        op.op
                    ),
                );
            }
            let missing: Vec<&str> = match op.op {
                Op::Conv => vec!["dilations", "groups", "pad", "pad_type", "strides"],
                Op::Matmul => vec!["transpose_x", "transpose_y"],
                Op::Concat => vec!["interleave"],
                _ => Vec::new(),
            }
            .into_iter()
            .filter(|p| op.arg(p).is_none())
            .collect();
            if !missing.is_empty() {
                self.on_op(
                    "ANE014",
                    op,
                    format!(
                        "parameters left at their defaults: {}; write them out",
                        missing.join(", ")
                    ),
                );
            }
            for lit in op_literals(op) {
                if let Some(blob) = lit.as_blob()
                    && blob.offset != 64
                {
                    self.on_op(
                        "ANE013",
                        op,
                        format!(
                            "BLOBFILE \"{}\" offset {} means several records in one file; M1 accepts only one tensor per file",
                            blob.path, blob.offset
                        ),
                    );
                }
            }
        }
    }

    fn ane_io(&mut self) {
        let func = &self.program.main;
        let inputs: Vec<(&str, TensorType)> = func
            .inputs
            .iter()
            .map(|v| (v.name.as_str(), v.ty.clone()))
            .collect();
        let outputs: Vec<(&str, TensorType)> = func
            .outputs
            .iter()
            .filter_map(|n| func.var_type(n).map(|t| (n.as_str(), t.clone())))
            .collect();
        if inputs.len() > 1 || outputs.len() > 1 {
            self.report(
                "ANE003",
                None,
                None,
                format!(
                    "{} inputs and {} outputs; pack them into one input (slice_by_size) and one output (concat)",
                    inputs.len(),
                    outputs.len()
                ),
            );
        }
        for (kind, list) in [("input", &inputs), ("output", &outputs)] {
            for (name, ty) in list.iter() {
                if ty.rank() != 4 || !ty.dtype.is_float() {
                    self.on_var(
                        "ANE001",
                        name,
                        format!("{kind} is {ty}; it must be a rank-4 fp16 or fp32 tensor"),
                    );
                    continue;
                }
                let s = &ty.shape;
                if s[0] != 1 || s[2] != 1 {
                    self.on_var("ANE002", name, format!("{kind} is {ty}, not [1, C, 1, S]"));
                }
                if kind == "input" && s.iter().any(|&d| d > layout::MAX_DIM) {
                    self.on_var(
                        "ANE019",
                        name,
                        format!("input is {ty}: dimensions above 65,536 fail to compile; chunk it"),
                    );
                }
                self.ane_io_size(kind, name, ty);
            }
        }
        if inputs.len() > 1 {
            let sizes: Vec<usize> = inputs
                .iter()
                .map(|(_, ty)| ty.byte_size().unwrap_or(0))
                .collect();
            if sizes.iter().any(|&b| b != sizes[0]) {
                let listed: Vec<String> = inputs
                    .iter()
                    .zip(&sizes)
                    .map(|((name, _), bytes)| format!("`{name}` {bytes}"))
                    .collect();
                self.report(
                    "ANE017",
                    None,
                    None,
                    format!(
                        "inputs hold different byte counts ({}); pad them to one size",
                        listed.join(", ")
                    ),
                );
            }
            let names: Vec<&str> = inputs.iter().map(|(name, _)| *name).collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            if names != sorted {
                self.report(
                    "ANE018",
                    None,
                    None,
                    format!(
                        "inputs are declared as {names:?}; declare them in name order {sorted:?}"
                    ),
                );
            }
        }
    }

    /// ANE009, ANE010, ANE015, ANE016 for one rank-4 input or output.
    fn ane_io_size(&mut self, kind: &str, name: &str, ty: &TensorType) {
        let s = &ty.shape;
        let (channels, height, width) = (s[1], s[2], s[3]);
        let hint = {
            let (c, w) = layout::padded_io(channels, height, width, ty.dtype);
            format!("pad it to [1, {c}, {height}, {w}] (mil::layout::padded_io)")
        };
        if channels < layout::MIN_CHANNELS {
            self.on_var(
                "ANE009",
                name,
                format!(
                    "{kind} has {channels} channels; kernels with fewer than 64 failed in probes; {hint}"
                ),
            );
        }
        let bytes = ty.byte_size().unwrap_or(0);
        if bytes < layout::MIN_SURFACE_BYTES {
            self.on_var(
                "ANE010",
                name,
                format!(
                    "{kind} is {bytes} bytes, below the 49,152-byte minimum surface (evaluate fails with 0x1d); {hint}"
                ),
            );
        }
        if width < layout::WIDTH_MULTIPLE || !width.is_multiple_of(layout::WIDTH_MULTIPLE) {
            self.on_var(
                "ANE015",
                name,
                format!(
                    "{kind} width {width} is not a multiple of 16 of at least 16 (silent data corruption); {hint}"
                ),
            );
        }
        let row = width * ty.dtype.byte_size().unwrap_or(4);
        if !row.is_multiple_of(layout::ROW_BYTES_MULTIPLE) {
            self.on_var(
                "ANE016",
                name,
                format!("{kind} rows are {row} bytes, not a multiple of 64; {hint}"),
            );
        }
    }

    /// ANE019: every dimension of the op's results fits the compiler.
    fn ane_dims(&mut self, op: &Operation) {
        let too_big = op
            .outputs
            .iter()
            .find(|v| v.ty.shape.iter().any(|&d| d > layout::MAX_DIM));
        if let Some(var) = too_big {
            self.on_op(
                "ANE019",
                op,
                format!(
                    "`{}` is {}: dimensions above 65,536 fail to compile; chunk it",
                    var.name, var.ty
                ),
            );
        }
    }

    /// ANE020, ANE021: the program's baked weights, over every BLOBFILE.
    fn ane_weights(&mut self) {
        let mut records = HashSet::new();
        let mut files = HashSet::new();
        let mut bytes: u64 = 0;
        let program = self.program;
        for (_, lit) in program.blob_refs() {
            let blob = lit.as_blob().expect("blob_refs yields blobs");
            files.insert(blob.path.as_str());
            if records.insert((blob.path.as_str(), blob.offset)) {
                bytes += lit.ty.byte_size().unwrap_or(0) as u64;
            }
        }
        if bytes > layout::MAX_BAKED_BYTES {
            self.report(
                "ANE020",
                None,
                None,
                format!(
                    "{bytes} bytes of baked weights exceed the compiler's 2,147,483,648; split the program into chunks"
                ),
            );
        }
        if files.len() > layout::MAX_WEIGHT_FILES {
            self.report(
                "ANE021",
                None,
                None,
                format!(
                    "{} weight files (more than 16 were reported to fail); write them as records of one weight.bin",
                    files.len()
                ),
            );
        }
    }

    /// ANE022: `rsqrt`/`sqrt` whose operand comes, through at most a few
    /// elementwise ops (the `+ eps`, `* 1/N`), from a reduction.
    fn ane_root_of_reduction(&mut self, op: &Operation) {
        let program = self.program;
        let func = &program.main;
        let mut frontier: Vec<&str> = op.arg("x").map(arg_vars).unwrap_or_default();
        for _ in 0..4 {
            let mut next = Vec::new();
            for var in frontier {
                let Some(Some(idx)) = self.defined_by.get(var).copied() else {
                    continue;
                };
                let producer = &func.ops[idx];
                if producer.op.mil_name().starts_with("reduce_") {
                    self.on_op(
                        "ANE022",
                        op,
                        format!(
                            "`{}` of the reduction \"{}\" was reported to fail to compile; use pow(x, {})",
                            op.op,
                            producer.name,
                            if op.op == Op::Rsqrt { "-0.5" } else { "0.5" }
                        ),
                    );
                    return;
                }
                if matches!(
                    producer.op.category(),
                    Category::Binary | Category::Elementwise
                ) {
                    next.extend(producer.args.iter().flat_map(|(_, a)| arg_vars(a)));
                }
            }
            frontier = next;
        }
    }

    /// ANE024: the softmax axis has a power-of-two size.
    fn ane_softmax(&mut self, op: &Operation) {
        let program = self.program;
        let func = &program.main;
        let axis = match op.arg("axis") {
            Some(Arg::Lit(l)) => l.as_int(),
            Some(Arg::Var(v)) => func.const_value(v).and_then(Literal::as_int),
            _ => Some(-1),
        };
        let shape = match op.arg("x") {
            Some(Arg::Var(v)) => func.var_type(v).map(|t| t.shape.clone()),
            _ => None,
        };
        let (Some(axis), Some(shape)) = (axis, shape) else {
            return;
        };
        let rank = shape.len() as i64;
        let Some(&size) = usize::try_from(if axis < 0 { axis + rank } else { axis })
            .ok()
            .and_then(|a| shape.get(a))
        else {
            return;
        };
        if !size.is_power_of_two() {
            self.on_op(
                "ANE024",
                op,
                format!(
                    "softmax over an axis of {size} (not a power of two) failed to compile elsewhere; pad the axis and mask the padding"
                ),
            );
        }
    }

    fn ane_conv(&mut self, op: &Operation) {
        let func = &self.program.main;
        let weight_is_const = match op.arg("weight") {
            Some(Arg::Lit(_)) => true,
            Some(Arg::Var(v)) => func
                .ops
                .iter()
                .any(|o| o.op.is_constant() && o.outputs.iter().any(|out| &out.name == v)),
            _ => true, // missing weight is MIL001's business
        };
        if !weight_is_const {
            self.on_op(
                "ANE004",
                op,
                "operand `weight` is a runtime value; conv weights must be constants (use matmul for runtime weights)".into(),
            );
        }
        let channels = match op.arg("x") {
            Some(Arg::Var(v)) => func.var_type(v).and_then(|t| t.shape.get(1).copied()),
            _ => None,
        };
        if let Some(c) = channels
            && c >= 32000
        {
            self.on_op(
                "ANE011",
                op,
                format!(
                    "{c} input channels; the compiler rejected a conv with 32,000 input channels"
                ),
            );
        }
    }
}

/// Check the MILBlob record at `offset` of `bytes` against the declared type:
/// sentinel, dtype code, payload size, payload inside the file (ane-reference §3.1).
fn check_blob_record(
    bytes: &[u8],
    offset: u64,
    ty: &TensorType,
) -> std::result::Result<(), String> {
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if bytes.len() < 64 || u32_at(4) != 2 {
        return Err("the file does not start with a version-2 MILBlob header".into());
    }
    let at = usize::try_from(offset).map_err(|_| "offset does not fit in memory".to_string())?;
    if at.checked_add(64).is_none_or(|end| end > bytes.len()) {
        return Err(format!("the file has only {} bytes", bytes.len()));
    }
    let sentinel = u32_at(at);
    if sentinel != 0xDEAD_BEEF {
        return Err(format!("sentinel is {sentinel:#010x}, not 0xdeadbeef"));
    }
    let code = u32_at(at + 4);
    let expected = blob_dtype_code(ty.dtype)
        .ok_or_else(|| format!("{} constants cannot live in a weight blob", ty.dtype))?;
    if code != expected {
        return Err(format!(
            "dtype code {code}, but the declared {ty} needs {expected}"
        ));
    }
    let size = u64_at(at + 8);
    let declared = ty.byte_size().unwrap_or(0) as u64;
    if size != declared {
        return Err(format!(
            "payload size {size}, but the declared {ty} needs {declared} bytes"
        ));
    }
    let data = u64_at(at + 16);
    if data < offset + 64
        || data
            .checked_add(size)
            .is_none_or(|end| end > bytes.len() as u64)
    {
        return Err(format!(
            "payload offset {data} with {size} bytes is outside the file ({} bytes) or overlaps the record",
            bytes.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTES: &str = include_str!("../../docs/ane-notes.md");

    #[test]
    fn docs_table_is_the_catalogue() {
        let table = rules_markdown_table();
        assert!(
            NOTES.contains(&table),
            "docs/ane-notes.md must contain the rule table exactly as rendered:\n{table}"
        );
        for r in RULES {
            assert!(
                NOTES.contains(&format!("| {} |", r.id)),
                "{} missing from docs",
                r.id
            );
        }
    }

    #[test]
    fn catalogue_ids_are_unique_and_sorted() {
        // Structural rules first, then the ANE rules, each group in id order.
        let ids: Vec<_> = RULES.iter().map(|r| r.id).collect();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| (id.starts_with("ANE"), *id));
        sorted.dedup();
        assert_eq!(ids, sorted);
        for r in RULES {
            assert!(
                r.id.starts_with("MIL") || r.id.starts_with("ANE"),
                "{}",
                r.id
            );
            assert!(!r.reason.contains('\n') && !r.rule.contains('|') && !r.reason.contains('|'));
        }
    }

    fn record(dtype_code: u32, size: u64, data_offset: u64, file_len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; file_len];
        bytes[0..4].copy_from_slice(&1u32.to_le_bytes());
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        bytes[64..68].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
        bytes[68..72].copy_from_slice(&dtype_code.to_le_bytes());
        bytes[72..80].copy_from_slice(&size.to_le_bytes());
        bytes[80..88].copy_from_slice(&data_offset.to_le_bytes());
        bytes
    }

    #[test]
    fn blob_record_checks() {
        // fp16 [2, 3] = 12 bytes of payload at 128.
        let ty = TensorType::new(DType::Fp16, [2, 3]);
        assert_eq!(check_blob_record(&record(1, 12, 128, 140), 64, &ty), Ok(()));
        assert!(
            check_blob_record(&record(2, 12, 128, 140), 64, &ty)
                .unwrap_err()
                .contains("dtype code 2")
        );
        assert!(
            check_blob_record(&record(1, 24, 128, 152), 64, &ty)
                .unwrap_err()
                .contains("payload size 24")
        );
        assert!(
            check_blob_record(&record(1, 12, 128, 139), 64, &ty)
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            check_blob_record(&record(1, 12, 128, 140), 128, &ty)
                .unwrap_err()
                .contains("only 140 bytes")
        );
        let mut bad = record(1, 12, 128, 140);
        bad[64] = 0;
        assert!(
            check_blob_record(&bad, 64, &ty)
                .unwrap_err()
                .contains("sentinel")
        );
    }
}
