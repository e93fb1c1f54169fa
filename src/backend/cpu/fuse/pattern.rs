//! Declarative patterns over the lowered program: a tree of ops written as a
//! constant ([`Pat`]), matched against the operation being lowered and the
//! operations defining its operands, with the values, scalars and operations
//! it names captured in a [`Match`].
//!
//! An op inside a pattern (not its root) must be used only by its consumer:
//! a fusion that absorbs it leaves no one else reading it. This file knows
//! nothing of kernels; the fusions check shapes and build steps.

use super::super::values::Values;
use crate::mil::{Arg, Op, Operation};

/// A pattern: what an operand (or the root operation) must be.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Pat {
    /// A named value, captured under the name; a name captured twice must
    /// be the same value.
    Value(&'static str),
    /// A constant scalar (inline or a `const`), captured under the name.
    Scalar(&'static str),
    /// The result of an op of kind `op` whose listed parameters match,
    /// captured (the operation) under `name`; with `commutes`, `x` and `y`
    /// may match the other way round.
    Op {
        op: Op,
        name: &'static str,
        args: &'static [(&'static str, Pat)],
        commutes: bool,
    },
    /// A tuple operand of exactly these members.
    Tuple(&'static [Pat]),
    /// The first of these that matches.
    Either(&'static [Pat]),
}

/// `op(args...)`, captured under `name`.
pub(crate) const fn op(op: Op, name: &'static str, args: &'static [(&'static str, Pat)]) -> Pat {
    Pat::Op {
        op,
        name,
        args,
        commutes: false,
    }
}

/// `op(x, y)` or `op(y, x)`, captured under `name`.
pub(crate) const fn commuting(
    op: Op,
    name: &'static str,
    args: &'static [(&'static str, Pat)],
) -> Pat {
    Pat::Op {
        op,
        name,
        args,
        commutes: true,
    }
}

/// What a pattern captured.
#[derive(Debug, Default)]
pub(crate) struct Match<'p> {
    values: Vec<(&'static str, &'p str)>,
    scalars: Vec<(&'static str, f32)>,
    ops: Vec<(&'static str, &'p Operation)>,
}

impl<'p> Match<'p> {
    /// The value captured under `name`.
    pub(crate) fn value(&self, name: &str) -> Option<&'p str> {
        self.values.iter().find(|(n, _)| *n == name).map(|c| c.1)
    }

    /// The scalar captured under `name`.
    pub(crate) fn scalar(&self, name: &str) -> Option<f32> {
        self.scalars.iter().find(|(n, _)| *n == name).map(|c| c.1)
    }

    /// The operation captured under `name`.
    pub(crate) fn op(&self, name: &str) -> Option<&'p Operation> {
        self.ops.iter().find(|(n, _)| *n == name).map(|c| c.1)
    }

    fn mark(&self) -> [usize; 3] {
        [self.values.len(), self.scalars.len(), self.ops.len()]
    }

    fn reset(&mut self, [v, s, o]: [usize; 3]) {
        self.values.truncate(v);
        self.scalars.truncate(s);
        self.ops.truncate(o);
    }
}

/// Match `pat` (an op pattern) with `op` as its root.
pub(crate) fn match_at<'p>(values: &Values<'p>, op: &'p Operation, pat: &Pat) -> Option<Match<'p>> {
    let mut m = Match::default();
    Matcher { values }.op(op, pat, &mut m).then_some(m)
}

struct Matcher<'a, 'p> {
    values: &'a Values<'p>,
}

impl<'p> Matcher<'_, 'p> {
    fn op(&self, op: &'p Operation, pat: &Pat, m: &mut Match<'p>) -> bool {
        let Pat::Op {
            op: kind,
            name,
            args,
            commutes,
        } = *pat
        else {
            return false;
        };
        if op.op != kind {
            return false;
        }
        let mark = m.mark();
        for swap in [false, true].into_iter().take(if commutes { 2 } else { 1 }) {
            m.ops.push((name, op));
            let all = args.iter().all(|(param, pat)| {
                let param = match (swap, *param) {
                    (true, "x") => "y",
                    (true, "y") => "x",
                    (_, p) => p,
                };
                op.arg(param).is_some_and(|arg| self.arg(arg, pat, m))
            });
            if all {
                return true;
            }
            m.reset(mark);
        }
        false
    }

    fn arg(&self, arg: &'p Arg, pat: &Pat, m: &mut Match<'p>) -> bool {
        match (*pat, arg) {
            (Pat::Value(name), Arg::Var(var)) => match m.value(name) {
                Some(seen) => seen == var,
                None => {
                    m.values.push((name, var));
                    true
                }
            },
            (Pat::Scalar(name), arg) => match self.values.scalar(arg) {
                Some(v) => {
                    m.scalars.push((name, v));
                    true
                }
                None => false,
            },
            (Pat::Op { .. }, Arg::Var(var)) => {
                self.values.uses(var) == 1
                    && self.values.def(var).is_some_and(|def| self.op(def, pat, m))
            }
            (Pat::Tuple(members), Arg::Tuple(items)) => {
                members.len() == items.len()
                    && members.iter().zip(items).all(|(p, a)| self.arg(a, p, m))
            }
            (Pat::Either(options), arg) => options.iter().any(|p| {
                let mark = m.mark();
                let ok = self.arg(arg, p, m);
                if !ok {
                    m.reset(mark);
                }
                ok
            }),
            _ => false,
        }
    }
}
