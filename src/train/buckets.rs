//! How data parallel's sum of the gradients is cut for overlap with the
//! backward ([`GradBuckets`]): a group per layer, in the order the backward
//! finishes them (the last layer first), then a group of everything else
//! (embedding, final norm, untied classifier), which the end of the pass
//! finishes. A group's gradients are its parameters' slices of the flat
//! gradient (merged where they touch: a layer's weights are contiguous in
//! `Weights`' layout, a layer's adapters in `Adapters`'); a group longer than
//! the largest layer's is cut into buckets of at most that length, so that a
//! few buckets in flight bound the memory of the sum.
//!
//! [`Readiness`] follows a pass: a group is ready once the pass has finished
//! every one of its parameters' gradients (`GradSink::finished`), which may
//! be while a later layer runs (the scheduler runs weight gradients beside
//! later kernels). What the sum is and how it travels is `dist`'s business.

use std::ops::Range;

use crate::dist::Overlapped;
use crate::model::lora::{Adapters, Target};
use crate::model::{Layout, Param};

/// The buckets of one flat gradient, in the order they are summed.
#[derive(Clone, Debug, PartialEq)]
pub struct GradBuckets {
    /// The flat gradient's length.
    len: usize,
    /// The parameters of each group: layer `n - 1 - g` for `g < n`, then
    /// the rest (with adapters: the adapted projections alone, no rest).
    groups: Vec<Vec<Param>>,
    buckets: Vec<Bucket>,
}

/// Part of a group's gradients, summed as one message.
#[derive(Clone, Debug, PartialEq)]
struct Bucket {
    group: usize,
    /// Slices of the flat gradient, in order.
    ranges: Vec<Range<usize>>,
    len: usize,
}

impl GradBuckets {
    /// The buckets of a full gradient of `layout`.
    pub fn of_weights(layout: &Layout) -> GradBuckets {
        let n = layout.config().n_layers;
        let mut groups: Vec<Vec<(Param, Vec<Range<usize>>)>> = vec![Vec::new(); n + 1];
        for param in layout.params() {
            let group = param.layer().map_or(n, |layer| n - 1 - layer);
            groups[group].push((param, vec![layout.range(param)]));
        }
        GradBuckets::new(layout.len(), groups)
    }

    /// The buckets of the gradient of `adapters` (their layout): a group per
    /// layer of its adapters' A and B.
    pub fn of_adapters(adapters: &Adapters) -> GradBuckets {
        let n = adapters.model().n_layers;
        let mut groups: Vec<Vec<(Param, Vec<Range<usize>>)>> = vec![Vec::new(); n + 1];
        for layer in 0..n {
            for target in Target::ALL {
                if adapters.contains(layer, target) {
                    let ranges = vec![
                        adapters.range_a(layer, target),
                        adapters.range_b(layer, target),
                    ];
                    groups[n - 1 - layer].push((target.param(layer), ranges));
                }
            }
        }
        GradBuckets::new(adapters.data.len(), groups)
    }

    /// Buckets of `groups` (parameters with their slices) of a flat
    /// gradient of `len` values: each group's slices sorted and merged,
    /// then cut into buckets no longer than the longest layer group.
    fn new(len: usize, groups: Vec<Vec<(Param, Vec<Range<usize>>)>>) -> GradBuckets {
        let mut merged: Vec<Vec<Range<usize>>> = Vec::with_capacity(groups.len());
        for group in &groups {
            let mut ranges: Vec<Range<usize>> =
                group.iter().flat_map(|(_, r)| r.iter().cloned()).collect();
            ranges.sort_by_key(|range| range.start);
            let mut joined: Vec<Range<usize>> = Vec::new();
            for range in ranges.into_iter().filter(|range| !range.is_empty()) {
                match joined.last_mut() {
                    Some(last) if last.end == range.start => last.end = range.end,
                    _ => joined.push(range),
                }
            }
            merged.push(joined);
        }
        let size = |ranges: &[Range<usize>]| ranges.iter().map(|r| r.len()).sum::<usize>();
        let layers = groups.len() - 1;
        let largest_layer = merged[..layers].iter().map(|r| size(r)).max();
        let most = largest_layer.filter(|&most| most > 0).unwrap_or(len).max(1);
        let mut buckets = Vec::new();
        for (group, ranges) in merged.into_iter().enumerate() {
            let mut bucket = Bucket {
                group,
                ranges: Vec::new(),
                len: 0,
            };
            for mut range in ranges {
                while !range.is_empty() {
                    let take = range.len().min(most - bucket.len);
                    bucket.ranges.push(range.start..range.start + take);
                    bucket.len += take;
                    range.start += take;
                    if bucket.len == most {
                        let next = Bucket {
                            group,
                            ranges: Vec::new(),
                            len: 0,
                        };
                        buckets.push(std::mem::replace(&mut bucket, next));
                    }
                }
            }
            if bucket.len > 0 {
                buckets.push(bucket);
            }
        }
        let groups = groups
            .into_iter()
            .map(|group| group.into_iter().map(|(param, _)| param).collect())
            .collect();
        GradBuckets {
            len,
            groups,
            buckets,
        }
    }

    /// The flat gradient's length.
    pub fn gradient_len(&self) -> usize {
        self.len
    }

    /// The number of buckets.
    pub fn count(&self) -> usize {
        self.buckets.len()
    }

    /// The values in `bucket`.
    pub fn bucket_len(&self, bucket: usize) -> usize {
        self.buckets[bucket].len
    }

    /// `bucket`'s slices of the flat gradient.
    pub fn ranges(&self, bucket: usize) -> &[Range<usize>] {
        &self.buckets[bucket].ranges
    }

    /// Copy `bucket`'s values of `flat` into `out`, slice after slice.
    pub fn gather(&self, bucket: usize, flat: &[f32], out: &mut [f32]) {
        let mut at = 0;
        for range in self.ranges(bucket) {
            out[at..at + range.len()].copy_from_slice(&flat[range.clone()]);
            at += range.len();
        }
    }

    /// Write `values` (gathered by [`GradBuckets::gather`]) back into `flat`.
    pub fn scatter(&self, bucket: usize, values: &[f32], flat: &mut [f32]) {
        let mut at = 0;
        for range in self.ranges(bucket) {
            flat[range.clone()].copy_from_slice(&values[at..at + range.len()]);
            at += range.len();
        }
    }

    /// Readiness of a new pass: no group finished yet.
    pub fn readiness(&self) -> Readiness<'_> {
        Readiness {
            buckets: self,
            finished: self.groups.iter().map(|g| vec![false; g.len()]).collect(),
            left: self.groups.iter().map(Vec::len).collect(),
            seen: 0,
            all: false,
        }
    }
}

/// A flat gradient no pass will change any more, every bucket ready: for
/// a rank that must take part in the sums of a backward it did not run.
pub struct Finished<'a> {
    pub buckets: &'a GradBuckets,
    pub grads: &'a mut [f32],
}

impl Overlapped for Finished<'_> {
    fn advance(&mut self) -> bool {
        false
    }
    fn buckets(&self) -> usize {
        self.buckets.count()
    }
    fn bucket_len(&self, bucket: usize) -> usize {
        self.buckets.bucket_len(bucket)
    }
    fn ready(&self, _bucket: usize) -> bool {
        true
    }
    fn gather(&self, bucket: usize, out: &mut [f32]) {
        self.buckets.gather(bucket, self.grads, out);
    }
    fn scatter(&mut self, bucket: usize, sum: &[f32]) {
        self.buckets.scatter(bucket, sum, self.grads);
    }
}

/// Which groups of [`GradBuckets`] a backward pass has finished.
pub struct Readiness<'b> {
    buckets: &'b GradBuckets,
    /// Per group, per parameter: finished.
    finished: Vec<Vec<bool>>,
    /// Per group: parameters not finished yet.
    left: Vec<usize>,
    /// The entries of the pass's finished list already counted.
    seen: usize,
    /// Every bucket ready (the pass ended, or failed).
    all: bool,
}

impl Readiness<'_> {
    /// Count the parameters the pass has finished so far (in the order it
    /// finished them; the list only grows during a pass).
    pub fn update(&mut self, finished: impl ExactSizeIterator<Item = Param>) {
        let total = finished.len();
        for param in finished.skip(self.seen) {
            let n = self.buckets.groups.len() - 1;
            let group = param.layer().map_or(n, |layer| n - 1 - layer);
            let params = &self.buckets.groups[group];
            if let Some(index) = params.iter().position(|p| *p == param)
                && !self.finished[group][index]
            {
                self.finished[group][index] = true;
                self.left[group] -= 1;
            }
        }
        self.seen = total;
    }

    /// Every bucket ready from now on: the pass is over (or failed).
    pub fn set_all(&mut self) {
        self.all = true;
    }

    /// Whether every gradient of `bucket` is final.
    pub fn ready(&self, bucket: usize) -> bool {
        self.all || self.left[self.buckets.buckets[bucket].group] == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::LoraConfig;
    use crate::model::{ModelConfig, Weights};

    /// Every element of the flat gradient is in exactly one bucket, and the
    /// buckets' slices do not overlap.
    fn assert_partition(buckets: &GradBuckets) {
        let mut count = vec![0u8; buckets.gradient_len()];
        for bucket in 0..buckets.count() {
            let ranges = buckets.ranges(bucket);
            let len: usize = ranges.iter().map(|r| r.len()).sum();
            assert_eq!(len, buckets.bucket_len(bucket));
            for range in ranges {
                for c in &mut count[range.clone()] {
                    *c += 1;
                }
            }
        }
        assert!(
            count.iter().all(|&c| c == 1),
            "an element in 0 or 2 buckets"
        );
    }

    #[test]
    fn a_layer_bucket_holds_that_layer_gradients_last_layer_first() {
        let config = ModelConfig {
            qkv_bias: true,
            qk_norm: true,
            tied_embeddings: false,
            ..ModelConfig::llama(32, 3, 4, 2, 64, 64, 16)
        };
        let layout = Weights::zeros(&config).layout;
        let buckets = GradBuckets::of_weights(&layout);
        assert_partition(&buckets);
        // Layer 2, then 1, then 0, each one contiguous slice: its parameters'
        // ranges, from `rms_att` to `w3`.
        for (bucket, layer) in [(0, 2), (1, 1), (2, 0)] {
            let start = layout.range(Param::RmsAtt(layer)).start;
            let end = layout.range(Param::W3(layer)).end;
            assert_eq!(
                buckets.ranges(bucket),
                std::slice::from_ref(&(start..end)),
                "layer {layer}"
            );
            assert_eq!(end - start, config.layer_params());
        }
        // The rest: the embedding (64 x 32 = 2048), then the final norm and
        // the classifier, cut at a layer's length.
        let layer = config.layer_params();
        let rest = 2 * 64 * 32 + 32;
        let tail: Vec<usize> = (3..buckets.count())
            .map(|b| buckets.bucket_len(b))
            .collect();
        assert_eq!(tail.iter().sum::<usize>(), rest);
        assert!(
            tail.iter().all(|&len| len <= layer),
            "{tail:?} over {layer}"
        );
        assert_eq!(
            buckets.ranges(3)[0].start,
            layout.range(Param::Embedding).start
        );
        let classifier = layout.range(Param::Classifier);
        assert_eq!(
            buckets.ranges(buckets.count() - 1).last().unwrap().end,
            classifier.end
        );
    }

    #[test]
    fn readiness_waits_for_every_gradient_of_a_layer() {
        let config = ModelConfig::llama(32, 2, 4, 2, 64, 64, 16);
        let layout = Weights::zeros(&config).layout;
        let buckets = GradBuckets::of_weights(&layout);
        let mut ready = buckets.readiness();
        let last_layer: Vec<Param> = layout
            .params()
            .into_iter()
            .filter(|p| p.layer() == Some(1))
            .collect();
        let (first, rest) = last_layer.split_at(3);
        ready.update(first.iter().copied());
        assert!(!ready.ready(0));
        // Counted once however often the list is read.
        ready.update(first.iter().copied());
        let all: Vec<Param> = first.iter().chain(rest).copied().collect();
        ready.update(all[..all.len() - 1].iter().copied());
        assert!(!ready.ready(0), "one gradient of layer 1 is missing");
        ready.update(all.iter().copied());
        assert!(ready.ready(0));
        assert!(!ready.ready(1), "layer 0 has not started");
        ready.set_all();
        assert!((0..buckets.count()).all(|b| ready.ready(b)));
    }

    #[test]
    fn adapter_buckets_hold_a_layers_adapters() {
        let config = ModelConfig::llama(32, 3, 4, 2, 64, 64, 16);
        let lora = LoraConfig::new(4, 8.0, 0.0, &[Target::Q, Target::Down], Some(2), 3).unwrap();
        let adapters = Adapters::zeros(&config, &lora).unwrap();
        let buckets = GradBuckets::of_adapters(&adapters);
        assert_partition(&buckets);
        // The last two layers are adapted: layer 2, then layer 1; nothing else.
        assert_eq!(buckets.count(), 2);
        for (bucket, layer) in [(0, 2), (1, 1)] {
            let start = adapters.range_a(layer, Target::Q).start;
            let end = adapters.range_b(layer, Target::Down).end;
            assert_eq!(
                buckets.ranges(bucket),
                std::slice::from_ref(&(start..end)),
                "layer {layer}"
            );
        }
        let mut ready = buckets.readiness();
        ready.update([Param::Wq(2)].into_iter());
        assert!(!ready.ready(0));
        ready.update([Param::Wq(2), Param::W2(2)].into_iter());
        assert!(ready.ready(0) && !ready.ready(1));
    }
}
